// DataLoader: shard parsing, batch order, wrap-around, several shards, reset, resume, and every
// kind of bad input ending in a clear fail().
#include <catch2/catch.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

#include "dataloader.h"
#include "test/test_util.h"

// ---- writing shards

struct ShardHeader {
    int magic, version, count;
};

// The header a correct shard of `ntok` tokens of this width has.
static ShardHeader good_header(int token_bytes, size_t ntok) {
    if (token_bytes == 2) return {20240520, 1, (int)ntok};
    return {20240801, 7, (int)ntok};
}

static void put_le(std::vector<unsigned char>& out, uint32_t v, int bytes) {
    for (int b = 0; b < bytes; b++) out.push_back((unsigned char)(v >> (8 * b)));
}

// Writes an llm.c token shard with the given header: 256 little-endian int32 (unused ones zero),
// then the tokens as uint16 (token_bytes 2) or uint32 (token_bytes 4).
static void write_shard(const std::string& path, int token_bytes, const std::vector<uint32_t>& tokens,
                        ShardHeader header) {
    std::vector<unsigned char> bytes;
    put_le(bytes, (uint32_t)header.magic, 4);
    put_le(bytes, (uint32_t)header.version, 4);
    put_le(bytes, (uint32_t)header.count, 4);
    bytes.resize(1024, 0);  // the header is 256 int32
    for (uint32_t t : tokens) put_le(bytes, t, token_bytes);
    write_bytes(path, bytes.data(), bytes.size());
}

static void write_shard(const std::string& path, int token_bytes, const std::vector<uint32_t>& tokens) {
    write_shard(path, token_bytes, tokens, good_header(token_bytes, tokens.size()));
}

// tokens[i] = start + i % modulus: a known sequence whose every window is easy to predict
static std::vector<uint32_t> sequence(size_t n, uint32_t start = 0, uint32_t modulus = 0xffffffffu) {
    std::vector<uint32_t> tokens(n);
    for (size_t i = 0; i < n; i++) tokens[i] = start + (uint32_t)(i % modulus);
    return tokens;
}

// Checks the loader's current batch is the window of `tokens` starting at `first`.
static void require_window(const DataLoader& loader, const std::vector<uint32_t>& tokens, size_t first) {
    for (int i = 0; i < loader.B * loader.T; i++) {
        INFO("window starting at " << first << ", element " << i);
        REQUIRE(loader.inputs[i] == (int)tokens[first + i]);
        REQUIRE(loader.targets[i] == (int)tokens[first + i + 1]);
    }
}

// ---- parsing

TEST_CASE("a uint16 shard gives the token ids stored in it", "[dataloader]") {
    std::string dir = make_temp_dir();
    // covers the whole uint16 range, both ends included, and both bytes of each id
    std::vector<uint32_t> tokens = {0, 1, 255, 256, 0x1234, 0xabcd, 65534, 65535, 7};
    write_shard(dir + "/a.bin", 2, tokens);
    DataLoader loader;
    dataloader_init(&loader, (dir + "/a.bin").c_str(), 2, 4, 65536);  // B*T = 8 = 9 tokens - 1; 65536 ids in uint16
    REQUIRE(loader.shard_token_bytes == std::vector<int>{2});
    REQUIRE(loader.shard_tokens == std::vector<size_t>{9});
    dataloader_next_batch(&loader);
    REQUIRE(std::vector<int>(loader.inputs, loader.inputs + 8) ==
            std::vector<int>{0, 1, 255, 256, 0x1234, 0xabcd, 65534, 65535});
    REQUIRE(std::vector<int>(loader.targets, loader.targets + 8) ==
            std::vector<int>{1, 255, 256, 0x1234, 0xabcd, 65534, 65535, 7});
    dataloader_free(&loader);
}

TEST_CASE("a uint32 shard gives token ids above 65535", "[dataloader]") {
    std::string dir = make_temp_dir();
    // ids that need the third and fourth byte; 151935 is the largest Qwen2 (vocab 151936) id
    std::vector<uint32_t> tokens = {3, 65535, 65536, 70000, 0x12345, 151935, 100000};
    write_shard(dir + "/a.bin", 4, tokens);
    DataLoader loader;
    dataloader_init(&loader, (dir + "/a.bin").c_str(), 3, 2, 151936);  // B*T = 6 = 7 tokens - 1
    REQUIRE(loader.shard_token_bytes == std::vector<int>{4});
    dataloader_next_batch(&loader);
    require_window(loader, tokens, 0);
    REQUIRE(loader.inputs[3] == 70000);
    dataloader_free(&loader);
}

// ---- order

TEST_CASE("batches come in file order with targets shifted by one", "[dataloader]") {
    std::string dir = make_temp_dir();
    const int B = 2, T = 4, V = 50;  // small, and V < the token count so ids repeat
    std::vector<uint32_t> tokens = sequence(100, 0, V);  // tokens[i] = i % 50
    write_shard(dir + "/a.bin", 2, tokens);
    DataLoader loader;
    dataloader_init(&loader, (dir + "/a.bin").c_str(), B, T, V);
    REQUIRE(dataloader_num_batches(&loader) == 12);  // (100 - 1) / 8
    for (int k = 0; k < 12; k++) {
        REQUIRE(loader.shard_index == 0);
        REQUIRE(loader.batch_index == (size_t)k);
        dataloader_next_batch(&loader);
        // batch k starts at token k*B*T; inputs[b*T + t] is row b, position t
        for (int i = 0; i < B * T; i++) {
            REQUIRE(loader.inputs[i] == (k * B * T + i) % V);
            REQUIRE(loader.targets[i] == (k * B * T + i + 1) % V);
        }
    }
    dataloader_free(&loader);
}

TEST_CASE("after the last whole batch the loader wraps to the first, skipping the partial window",
          "[dataloader]") {
    std::string dir = make_temp_dir();
    const int B = 1, T = 5;
    // 2 whole windows (2*5 + 1 tokens) plus 3 tokens that can't make a third
    std::vector<uint32_t> tokens = sequence(14, 100);
    write_shard(dir + "/a.bin", 2, tokens);
    DataLoader loader;
    dataloader_init(&loader, (dir + "/a.bin").c_str(), B, T, 1000);
    REQUIRE(dataloader_num_batches(&loader) == 2);  // (14 - 1) / 5
    dataloader_next_batch(&loader);
    require_window(loader, tokens, 0);
    dataloader_next_batch(&loader);
    require_window(loader, tokens, 5);
    REQUIRE(loader.shard_index == 0);
    REQUIRE(loader.batch_index == 0);
    dataloader_next_batch(&loader);
    require_window(loader, tokens, 0);
    dataloader_free(&loader);
}

TEST_CASE("a shard of exactly k*B*T tokens holds k-1 batches: the last target needs one more token",
          "[dataloader]") {
    std::string dir = make_temp_dir();
    write_shard(dir + "/a.bin", 2, sequence(12));  // 3 * B*T tokens
    DataLoader loader;
    dataloader_init(&loader, (dir + "/a.bin").c_str(), 2, 2, 100);  // B*T = 4
    REQUIRE(dataloader_num_batches(&loader) == 2);  // (12 - 1) / 4
    dataloader_free(&loader);
}

// ---- several shards

TEST_CASE("a pattern matching two shards reads them in sorted name order, then wraps", "[dataloader]") {
    std::string dir = make_temp_dir();
    const int B = 2, T = 3;  // B*T = 6
    // the uint32 shard is written first and sorts second, so neither write order nor width decides
    std::vector<uint32_t> second = sequence(20, 70000);  // (20 - 1) / 6 = 3 batches
    std::vector<uint32_t> first = sequence(13, 10);      // (13 - 1) / 6 = 2 batches
    write_shard(dir + "/train_001.bin", 4, second);
    write_shard(dir + "/train_000.bin", 2, first);
    write_shard(dir + "/val_000.bin", 2, first);  // not matched by the pattern
    DataLoader loader;
    dataloader_init(&loader, (dir + "/train_*.bin").c_str(), B, T, 100000);
    REQUIRE(loader.shard_paths == std::vector<std::string>{dir + "/train_000.bin", dir + "/train_001.bin"});
    REQUIRE(loader.shard_tokens == std::vector<size_t>{13, 20});
    REQUIRE(loader.shard_token_bytes == std::vector<int>{2, 4});
    REQUIRE(dataloader_num_batches(&loader) == 5);  // 2 + 3

    for (int k = 0; k < 2; k++) {
        dataloader_next_batch(&loader);
        require_window(loader, first, (size_t)k * 6);
    }
    // the first shard's last token (index 12) is only a target; the second shard starts fresh
    REQUIRE(loader.shard_index == 1);
    REQUIRE(loader.batch_index == 0);
    for (int k = 0; k < 3; k++) {
        dataloader_next_batch(&loader);
        require_window(loader, second, (size_t)k * 6);
    }
    REQUIRE(loader.shard_index == 0);
    REQUIRE(loader.batch_index == 0);
    dataloader_next_batch(&loader);
    require_window(loader, first, 0);
    dataloader_free(&loader);
}

TEST_CASE("reset returns to shard 0, batch 0", "[dataloader]") {
    std::string dir = make_temp_dir();
    std::vector<uint32_t> a = sequence(9, 0), b = sequence(9, 500);  // 2 batches each with B*T = 4
    write_shard(dir + "/s0.bin", 2, a);
    write_shard(dir + "/s1.bin", 2, b);
    DataLoader loader;
    dataloader_init(&loader, (dir + "/s*.bin").c_str(), 1, 4, 1000);
    for (int k = 0; k < 3; k++) dataloader_next_batch(&loader);  // into the second shard
    REQUIRE(loader.shard_index == 1);
    dataloader_reset(&loader);
    REQUIRE(loader.shard_index == 0);
    REQUIRE(loader.batch_index == 0);
    dataloader_next_batch(&loader);
    require_window(loader, a, 0);
    dataloader_free(&loader);
}

TEST_CASE("restoring shard_index and batch_index resumes at that batch", "[dataloader]") {
    std::string dir = make_temp_dir();
    std::vector<uint32_t> a = sequence(9, 0), b = sequence(13, 500);  // 2 and 3 batches with B*T = 4
    write_shard(dir + "/s0.bin", 2, a);
    write_shard(dir + "/s1.bin", 4, b);
    DataLoader loader;
    dataloader_init(&loader, (dir + "/s*.bin").c_str(), 2, 2, 1000);
    loader.shard_index = 1;
    loader.batch_index = 2;
    dataloader_next_batch(&loader);
    require_window(loader, b, 8);  // batch 2 starts at 2 * B*T
    REQUIRE(loader.shard_index == 0);  // that was the last batch
    REQUIRE(loader.batch_index == 0);

    // a position from a different run (other shards, B or T) fails instead of reading garbage
    loader.shard_index = 1;
    loader.batch_index = 3;
    REQUIRE_FAILS_WITH("batch_index 3 is out of range", dataloader_next_batch(&loader));
    loader.shard_index = 2;
    loader.batch_index = 0;
    REQUIRE_FAILS_WITH("shard_index 2 is out of range", dataloader_next_batch(&loader));
    dataloader_free(&loader);
}

// ---- one document per row (--pad-id)

TEST_CASE("with a padding token the loader reads one document per row: no target across rows or on padding",
          "[dataloader][rows]") {
    std::string dir = make_temp_dir();
    const int B = 2, T = 4, pad = 0;
    // 5 rows of 4: a full row, a row of 2 then padding, a row of 1 token, a full row, a row of 3
    std::vector<uint32_t> tokens = {5, 6, 7, 8, 9, 10, 0, 0, 11, 0, 0, 0, 12, 13, 14, 15, 16, 17, 18, 0};
    write_shard(dir + "/a.bin", 2, tokens);
    DataLoader loader;
    dataloader_init(&loader, (dir + "/a.bin").c_str(), B, T, 20, pad);
    // 5 rows hold 2 whole batches of 2 rows (the fifth row is left over, as a stream's tail is)
    CHECK(dataloader_num_batches(&loader) == 2);
    const int X = IGNORED_TARGET;
    const std::vector<int> targets0 = {6, 7, 8, X, 10, X, X, X}, targets1 = {X, X, X, X, 13, 14, 15, X};
    for (int pass = 0; pass < 2; pass++) {   // and the same again after wrapping around
        dataloader_next_batch(&loader);
        CHECK(std::vector<int>(loader.inputs, loader.inputs + B * T) == std::vector<int>({5, 6, 7, 8, 9, 10, 0, 0}));
        CHECK(std::vector<int>(loader.targets, loader.targets + B * T) == targets0);
        dataloader_next_batch(&loader);
        CHECK(std::vector<int>(loader.inputs, loader.inputs + B * T) == std::vector<int>({11, 0, 0, 0, 12, 13, 14, 15}));
        CHECK(std::vector<int>(loader.targets, loader.targets + B * T) == targets1);
    }
    CHECK(loader.epoch == 2);
    dataloader_free(&loader);

    // shuffled: the same batches, visited in the epoch's order
    DataLoader shuffled;
    dataloader_init(&shuffled, (dir + "/a.bin").c_str(), B, T, 20, pad);
    shuffled.shuffled = true;
    shuffled.shuffle_seed = 3;
    std::vector<size_t> order;
    dataloader_shuffled_order(&order, 2, 3, 0);
    for (size_t k = 0; k < 2; k++) {
        dataloader_next_batch(&shuffled);
        CHECK(std::vector<int>(shuffled.targets, shuffled.targets + B * T) == (order[k] == 0 ? targets0 : targets1));
    }
    dataloader_free(&shuffled);
}

TEST_CASE("with a padding token, a shard that is not whole rows, or too few of them, fails naming it", "[dataloader][rows]") {
    std::string dir = make_temp_dir();
    write_shard(dir + "/a.bin", 2, sequence(10, 1));
    DataLoader loader;
    REQUIRE_FAILS_WITH("'" + dir + "/a.bin': 10 tokens are not whole rows of T = 4 tokens",
                       dataloader_init(&loader, (dir + "/a.bin").c_str(), 1, 4, 20, 0));
    REQUIRE_FAILS_WITH("'" + dir + "/a.bin': shard has 2 rows of 5 tokens, fewer than the B = 3 one batch needs",
                       dataloader_init(&loader, (dir + "/a.bin").c_str(), 3, 5, 20, 0));
    REQUIRE_FAILS_WITH("the padding token 20 is not in the vocabulary [0, 20)",
                       dataloader_init(&loader, (dir + "/a.bin").c_str(), 1, 5, 20, 20));
}

// ---- bad input

TEST_CASE("a pattern that matches no file fails naming the pattern", "[dataloader]") {
    std::string dir = make_temp_dir();
    std::string pattern = dir + "/train_*.bin";
    DataLoader loader;
    REQUIRE_FAILS_WITH("no files match '" + pattern + "'", dataloader_init(&loader, pattern.c_str(), 1, 1, 10));
}

TEST_CASE("a matched file that cannot be opened fails naming it", "[dataloader]") {
    std::string dir = make_temp_dir();
    // a dangling symlink matches the glob but can't be opened (chmod wouldn't stop root)
    REQUIRE(symlink((dir + "/missing.bin").c_str(), (dir + "/a.bin").c_str()) == 0);
    DataLoader loader;
    REQUIRE_FAILS_WITH("cannot open '" + dir + "/a.bin'",
                       dataloader_init(&loader, (dir + "/*.bin").c_str(), 1, 1, 10));
}

TEST_CASE("a matched file that cannot be read fails naming it", "[dataloader]") {
    std::string dir = make_temp_dir();
    // a directory opens on Linux but reading it fails
    REQUIRE(mkdir((dir + "/a.bin").c_str(), 0700) == 0);
    DataLoader loader;
    REQUIRE_FAILS_WITH("cannot read '" + dir + "/a.bin'",
                       dataloader_init(&loader, (dir + "/*.bin").c_str(), 1, 1, 10));
}

TEST_CASE("a file shorter than the 1024-byte header fails", "[dataloader]") {
    std::string dir = make_temp_dir();
    unsigned char bytes[100] = {0};  // any size below 1024
    write_bytes(dir + "/a.bin", bytes, sizeof(bytes));
    DataLoader loader;
    REQUIRE_FAILS_WITH("header is only 100 bytes",
                       dataloader_init(&loader, (dir + "/a.bin").c_str(), 1, 1, 10));
}

TEST_CASE("a wrong magic number fails", "[dataloader]") {
    std::string dir = make_temp_dir();
    write_shard(dir + "/a.bin", 2, sequence(10), {12345, 1, 10});  // 12345: neither known magic
    DataLoader loader;
    REQUIRE_FAILS_WITH("bad magic number 12345",
                       dataloader_init(&loader, (dir + "/a.bin").c_str(), 1, 1, 10));
}

TEST_CASE("the uint16 magic with a version other than 1 fails saying 1 was expected", "[dataloader]") {
    std::string dir = make_temp_dir();
    write_shard(dir + "/a.bin", 2, sequence(10), {20240520, 7, 10});  // 7: the uint32 version
    DataLoader loader;
    REQUIRE_FAILS_WITH("expects version 1, but the header says version 7",
                       dataloader_init(&loader, (dir + "/a.bin").c_str(), 1, 1, 10));
}

TEST_CASE("the uint32 magic with a version other than 7 fails saying 7 was expected", "[dataloader]") {
    std::string dir = make_temp_dir();
    write_shard(dir + "/a.bin", 4, sequence(10), {20240801, 1, 10});  // 1: the uint16 version
    DataLoader loader;
    REQUIRE_FAILS_WITH("expects version 7, but the header says version 1",
                       dataloader_init(&loader, (dir + "/a.bin").c_str(), 1, 1, 10));
}

TEST_CASE("a negative token count in the header fails", "[dataloader]") {
    std::string dir = make_temp_dir();
    write_shard(dir + "/a.bin", 2, sequence(10), {20240520, 1, -3});
    DataLoader loader;
    REQUIRE_FAILS_WITH("negative token count (-3)",
                       dataloader_init(&loader, (dir + "/a.bin").c_str(), 1, 1, 10));
}

TEST_CASE("a truncated shard fails at init even when it is not the first", "[dataloader]") {
    std::string dir = make_temp_dir();
    write_shard(dir + "/s0.bin", 2, sequence(10));
    write_shard(dir + "/s1.bin", 2, sequence(10), {20240520, 1, 20});  // claims 20, holds 10
    DataLoader loader;
    // 1024 + 20*2 = 1064 expected; 1024 + 10*2 = 1044 on disk
    REQUIRE_FAILS_WITH("'" + dir + "/s1.bin': truncated: header says 20 tokens (1064 bytes) but the file holds 1044 bytes",
                       dataloader_init(&loader, (dir + "/s*.bin").c_str(), 1, 1, 10));
}

TEST_CASE("a shard longer than its header says fails (trailing bytes)", "[dataloader]") {
    std::string dir = make_temp_dir();
    write_shard(dir + "/a.bin", 4, sequence(10), {20240801, 7, 9});  // claims 9, holds 10
    DataLoader loader;
    // 1024 + 9*4 = 1060 expected; 1024 + 10*4 = 1064 on disk
    REQUIRE_FAILS_WITH("trailing bytes: header says 9 tokens (1060 bytes) but the file holds 1064 bytes",
                       dataloader_init(&loader, (dir + "/a.bin").c_str(), 1, 1, 10));
}

TEST_CASE("a shard with fewer than B*T+1 tokens fails naming B, T and the count", "[dataloader]") {
    std::string dir = make_temp_dir();
    write_shard(dir + "/a.bin", 2, sequence(12));  // exactly B*T: one short of a window
    DataLoader loader;
    REQUIRE_FAILS_WITH("shard has 12 tokens, fewer than the B*T+1 = 13 one batch needs (B=3, T=4)",
                       dataloader_init(&loader, (dir + "/a.bin").c_str(), 3, 4, 100));
}

TEST_CASE("a token id not below vocab_size fails when its batch is read", "[dataloader]") {
    std::string dir = make_temp_dir();
    std::vector<uint32_t> tokens = sequence(9);  // 2 batches with B*T = 4, ids 0..8
    tokens[6] = 50;  // == vocab_size, in the second batch (tokens 4..8)
    write_shard(dir + "/a.bin", 2, tokens);
    DataLoader loader;
    dataloader_init(&loader, (dir + "/a.bin").c_str(), 1, 4, 50);  // init does not read tokens
    dataloader_next_batch(&loader);                                 // the first batch is clean
    REQUIRE_FAILS_WITH("'" + dir + "/a.bin': token at position 6 is 50, not below vocab_size 50",
                       dataloader_next_batch(&loader));
    dataloader_free(&loader);
}

TEST_CASE("the last target of a window is checked against vocab_size too", "[dataloader]") {
    std::string dir = make_temp_dir();
    std::vector<uint32_t> tokens = sequence(5);  // one batch with B*T = 4
    tokens[4] = 70000;  // only ever a target; above every uint16 id, so uint32
    write_shard(dir + "/a.bin", 4, tokens);
    DataLoader loader;
    dataloader_init(&loader, (dir + "/a.bin").c_str(), 2, 2, 65536);
    REQUIRE_FAILS_WITH("token at position 4 is 70000, not below vocab_size 65536",
                       dataloader_next_batch(&loader));
    dataloader_free(&loader);
}

TEST_CASE("B or T below 1 fails", "[dataloader]") {
    std::string dir = make_temp_dir();
    write_shard(dir + "/a.bin", 2, sequence(10));
    std::string path = dir + "/a.bin";
    DataLoader loader;
    REQUIRE_FAILS_WITH("B and T must be at least 1, got B=0, T=4", dataloader_init(&loader, path.c_str(), 0, 4, 10));
    REQUIRE_FAILS_WITH("B and T must be at least 1, got B=2, T=-1", dataloader_init(&loader, path.c_str(), 2, -1, 10));
}

TEST_CASE("vocab_size below 1 fails", "[dataloader]") {
    std::string dir = make_temp_dir();
    write_shard(dir + "/a.bin", 2, sequence(10));
    DataLoader loader;
    REQUIRE_FAILS_WITH("vocab_size must be at least 1, got 0",
                       dataloader_init(&loader, (dir + "/a.bin").c_str(), 1, 1, 0));
}

// ---- shuffled order (--data-order shuffled)

// Which batch the loader just read, as its global number: each batch of a shard of `sequence(n,
// start)` tokens begins with start + k*B*T, so the first input names the shard and the batch.
static int global_batch(const DataLoader& loader, const std::vector<uint32_t>& starts, const std::vector<int>& offsets) {
    for (size_t s = starts.size(); s-- > 0;) {
        if ((uint32_t)loader.inputs[0] >= starts[s]) return offsets[s] + (int)((loader.inputs[0] - starts[s]) / (loader.B * loader.T));
    }
    return -1;
}

TEST_CASE("shuffled: every epoch visits each batch of every shard once, in an order of its own that the position restores",
          "[dataloader]") {
    std::string dir = make_temp_dir();
    const int B = 1, T = 4;
    // shards of 3 and 5 batches: global batches 0-2 and 3-7
    write_shard(dir + "/s0.bin", 2, sequence(13, 0));
    write_shard(dir + "/s1.bin", 2, sequence(21, 1000));
    const std::vector<uint32_t> starts = {0, 1000};
    const std::vector<int> offsets = {0, 3};
    const int N = 8;
    auto epochs_of = [&](uint64_t seed, int epochs) {
        DataLoader loader;
        dataloader_init(&loader, (dir + "/s*.bin").c_str(), B, T, 2000);
        loader.shuffled = true;
        loader.shuffle_seed = seed;
        std::vector<std::vector<int>> orders(epochs);
        for (int e = 0; e < epochs; e++) {
            REQUIRE(loader.epoch == e);
            for (int k = 0; k < N; k++) {
                dataloader_next_batch(&loader);
                int g = global_batch(loader, starts, offsets);
                // the window read is the whole batch g, from its shard
                require_window(loader, sequence(g < 3 ? 13 : 21, g < 3 ? 0 : 1000), (size_t)(g < 3 ? g : g - 3) * B * T);
                orders[e].push_back(g);
            }
        }
        REQUIRE(loader.epoch == epochs);
        dataloader_free(&loader);
        return orders;
    };
    std::vector<std::vector<int>> orders = epochs_of(7, 3);
    std::vector<int> in_order = {0, 1, 2, 3, 4, 5, 6, 7};
    for (const auto& order : orders) {
        std::vector<int> sorted = order;
        std::sort(sorted.begin(), sorted.end());
        CHECK(sorted == in_order);   // a permutation: each batch once
        CHECK(order != in_order);    // (8! orders: the chance of drawing this one is 1/40320)
    }
    CHECK(orders[0] != orders[1]);
    CHECK(orders[1] != orders[2]);
    // the order is a function of the seed and the epoch: the same again, another with another seed
    CHECK(epochs_of(7, 3) == orders);
    CHECK(epochs_of(8, 1)[0] != orders[0]);
    // it is dataloader_shuffled_order's
    std::vector<size_t> drawn;
    dataloader_shuffled_order(&drawn, N, 7, 1);
    CHECK(std::vector<int>(drawn.begin(), drawn.end()) == orders[1]);
    // a loader put at (epoch 1, visit 5: shard 1, batch 2), as a resumed run is, reads on from there
    DataLoader resumed;
    dataloader_init(&resumed, (dir + "/s*.bin").c_str(), B, T, 2000);
    resumed.shuffled = true;
    resumed.shuffle_seed = 7;
    resumed.epoch = 1;
    resumed.shard_index = 1;
    resumed.batch_index = 2;
    std::vector<int> rest;
    for (int k = 5; k < N + 2; k++) {
        dataloader_next_batch(&resumed);
        rest.push_back(global_batch(resumed, starts, offsets));
    }
    CHECK(rest == std::vector<int>{orders[1][5], orders[1][6], orders[1][7], orders[2][0], orders[2][1]});
    dataloader_free(&resumed);
}
