// main() of build/test_gpu, the GPU build of the kernel tests: on a machine without a usable GPU it
// says so and runs nothing (the tests count as skipped, not passed); otherwise it runs them all.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>

#include <cuda_runtime.h>

int main(int argc, char** argv) {
    int devices = 0;
    cudaError_t error = cudaGetDeviceCount(&devices);
    if (error != cudaSuccess || devices == 0) {
        printf("build/test_gpu: no GPU (%s): every GPU test skipped, none run\n",
               error != cudaSuccess ? cudaGetErrorString(error) : "0 devices");
        // dev/device_check.sh sets MIXLN_REQUIRE_GPU: there a missing GPU is a failure
        const char* require = getenv("MIXLN_REQUIRE_GPU");
        return require != nullptr && require[0] == '1' ? 1 : 0;
    }
    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);
    printf("build/test_gpu: running on %s\n", prop.name);
    return Catch::Session().run(argc, argv);
}
