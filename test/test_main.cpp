// Catch2's main lives here, in its own translation unit, so the test files compile faster.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
