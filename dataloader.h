/*
DataLoader: streams (inputs, targets) batches of token ids from llm.c-format token shards.

A shard is a header of 256 little-endian int32 (1024 bytes) followed by the tokens:
    header[0] = magic, header[1] = version, header[2] = token count
    magic 20240520, version 1: uint16 tokens (GPT-2 style vocabularies)
    magic 20240801, version 7: uint32 tokens (vocabularies above 65536)
A glob pattern names the shards; they are read in sorted name order.

Batch k of a shard is the window of B*T+1 tokens starting at k*B*T: inputs are its first B*T
tokens, targets the same window shifted by one. A shard holds (ntok - 1) / (B*T) whole batches;
a trailing partial window is skipped. After the last batch of a shard comes the next shard, and
after the last shard the loader wraps around to shard 0, batch 0: one pass over the data is an
epoch. In order, (shard_index, batch_index) is the whole position and a resumed run restores it.

One document per row (train's --pad-id P; dev/data/prepare.py --rows T writes such shards, as
the paper's data was made: each document truncated or padded to T tokens): the shard is rows of
T tokens, and batch k is rows k*B .. k*B+B-1, the B*T tokens from k*B*T, with nothing shared
between rows. Inputs are the rows; the target of position t is the row's token t+1, except that
a padding token (P) is no target, nor is anything after a row's last position: those targets are
IGNORED_TARGET, and the loss is the mean over the rest (PyTorch's ignore_index). A shard then
holds ntok / (B*T) batches, and ntok must be whole rows.

Shuffled (train's --data-order shuffled): every epoch visits the same batches, of all shards
together, in an order of its own, a Fisher-Yates shuffle driven by splitmix64 from (shuffle_seed,
epoch) alone. (shard_index, batch_index) then counts the visits of the epoch, and visit k reads
batch order[k] (batches numbered through the shards in order). So (epoch, shard_index,
batch_index) is still the whole position, and a resumed run draws the same order again.

Each batch is read with fseek/fread: shards can be gigabytes, and a batch is a few KB to MB.
Everything that can be checked cheaply is checked at init (header, and every shard's file size
against its token count), so a bad shard fails at startup rather than hours into a run. Token ids
are checked against vocab_size as each batch is read: an id out of range would otherwise index
past the embedding table silently.
*/
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <glob.h>
#include <sys/types.h>

#include "common.h"

#define DATALOADER_HEADER_INTS 256
#define DATALOADER_HEADER_BYTES (DATALOADER_HEADER_INTS * 4)
#define DATALOADER_MAGIC_U16 20240520
#define DATALOADER_VERSION_U16 1
#define DATALOADER_MAGIC_U32 20240801
#define DATALOADER_VERSION_U32 7

struct DataLoader {
    int B = 0, T = 0;         // batch size, sequence length
    int vocab_size = 0;       // every token id must be < vocab_size
    std::vector<std::string> shard_paths;     // sorted glob matches
    std::vector<size_t> shard_tokens;         // token count of each shard
    std::vector<int> shard_token_bytes;       // 2 or 4
    // position of the next batch; public so a resumed run can save and restore it
    int epoch = 0;            // passes over the data completed
    int shard_index = 0;      // shard the next batch comes from (shuffled: the next visit, counted
    size_t batch_index = 0;   // as if in order); batch within that shard: it takes tokens
                              // [batch_index*B*T, batch_index*B*T + B*T + 1)
    int pad_id = -1;          // >= 0: one document per row, padded with this token (see the top); -1: a stream
    bool shuffled = false;    // --data-order shuffled
    uint64_t shuffle_seed = 0;
    std::vector<size_t> order;   // shuffled: the batches of epoch order_epoch, in visiting order
    int order_epoch = -1;
    int* inputs = nullptr;    // (B, T) token ids
    int* targets = nullptr;   // (B, T) the next token after each input
    // one shard is open at a time; switching shards closes it and opens the next
    FILE* file = nullptr;
    int file_shard = -1;      // which shard `file` holds open, -1 if none
    unsigned char* read_buffer = nullptr;   // (B*T+1) * 4 bytes: one window of raw tokens, widest case
};

// ---- helpers

inline int32_t dataloader_read_le_int32(const unsigned char* p) {
    return (int32_t)((uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24));
}

// Reads and checks one shard's header and size. Returns the token count and sets *token_bytes.
// rows: the shard holds one document per row of T tokens (pad_id >= 0).
inline size_t dataloader_check_shard(const char* path, int B, int T, bool rows, int* token_bytes) {
    FILE* f = fopen_or_fail(path, "rb");
    unsigned char header[DATALOADER_HEADER_BYTES];
    size_t got = fread(header, 1, sizeof(header), f);
    // a directory opens fine on Linux and only fails here, with EISDIR
    if (ferror(f)) fail("cannot read '%s': %s", path, strerror(errno));
    if (got < sizeof(header)) {
        fail("'%s': header is only %zu bytes; a shard starts with a %d-byte header", path, got,
             DATALOADER_HEADER_BYTES);
    }
    int magic = dataloader_read_le_int32(header);
    int version = dataloader_read_le_int32(header + 4);
    int count = dataloader_read_le_int32(header + 8);
    if (magic == DATALOADER_MAGIC_U16) {
        if (version != DATALOADER_VERSION_U16) {
            fail("'%s': magic %d (uint16 tokens) expects version %d, but the header says version %d",
                 path, magic, DATALOADER_VERSION_U16, version);
        }
        *token_bytes = 2;
    } else if (magic == DATALOADER_MAGIC_U32) {
        if (version != DATALOADER_VERSION_U32) {
            fail("'%s': magic %d (uint32 tokens) expects version %d, but the header says version %d",
                 path, magic, DATALOADER_VERSION_U32, version);
        }
        *token_bytes = 4;
    } else {
        fail("'%s': bad magic number %d (expected %d for uint16 tokens or %d for uint32 tokens)",
             path, magic, DATALOADER_MAGIC_U16, DATALOADER_MAGIC_U32);
    }
    if (count < 0) fail("'%s': header says a negative token count (%d)", path, count);

    // the file must hold exactly the header plus `count` tokens: fewer means a cut-off copy,
    // more means the header and the data disagree, and either way the tokens can't be trusted
    if (fseeko(f, 0, SEEK_END) != 0) fail("cannot seek in '%s': %s", path, strerror(errno));
    off_t file_bytes = ftello(f);
    if (file_bytes < 0) fail("cannot get the size of '%s': %s", path, strerror(errno));
    fclose(f);
    size_t expected_bytes = DATALOADER_HEADER_BYTES + (size_t)count * *token_bytes;
    if ((size_t)file_bytes < expected_bytes) {
        fail("'%s': truncated: header says %d tokens (%zu bytes) but the file holds %zu bytes",
             path, count, expected_bytes, (size_t)file_bytes);
    }
    if ((size_t)file_bytes > expected_bytes) {
        fail("'%s': trailing bytes: header says %d tokens (%zu bytes) but the file holds %zu bytes",
             path, count, expected_bytes, (size_t)file_bytes);
    }

    if (rows) {
        // whole rows of T tokens, and at least B of them
        if (count % T != 0) {
            fail("'%s': %d tokens are not whole rows of T = %d tokens (with --pad-id a shard holds one document "
                 "per row of the run's sequence length)", path, count, T);
        }
        if ((size_t)count < (size_t)B * T) {
            fail("'%s': shard has %d rows of %d tokens, fewer than the B = %d one batch needs", path, count / T, T, B);
        }
        return (size_t)count;
    }
    // one batch needs B*T inputs plus one more token for the last target
    size_t window = (size_t)B * T + 1;
    if ((size_t)count < window) {
        fail("'%s': shard has %d tokens, fewer than the B*T+1 = %zu one batch needs (B=%d, T=%d)",
             path, count, window, B, T);
    }
    return (size_t)count;
}

inline size_t dataloader_shard_batches(const DataLoader* loader, int shard) {
    size_t BT = (size_t)loader->B * loader->T;
    return loader->pad_id >= 0 ? loader->shard_tokens[shard] / BT : (loader->shard_tokens[shard] - 1) / BT;
}

// ---- API

inline void dataloader_reset(DataLoader* loader) {
    loader->epoch = 0;
    loader->shard_index = 0;
    loader->batch_index = 0;
}

// The shuffled order of an epoch's n batches: Fisher-Yates (for i from n-1 down to 1, swap i with
// j = r mod (i+1)), r from splitmix64 started at mix(mix(seed ^ C) + epoch * STEP), so epochs draw
// unrelated sequences. (The modulo's bias is below n / 2^64.) dev/reference.py draws the same.
inline void dataloader_shuffled_order(std::vector<size_t>* order, size_t n, uint64_t seed, int epoch) {
    order->resize(n);
    for (size_t i = 0; i < n; i++) (*order)[i] = i;
    uint64_t state = splitmix64_mix(splitmix64_mix(seed ^ 0xDA7A0DE5EED5ull) + (uint64_t)epoch * SPLITMIX64_STEP);
    for (size_t i = n; i > 1; i--) {
        // position i-1 swaps with one of 0..i-1
        size_t j = (size_t)(random_u64(&state) % (uint64_t)i);
        std::swap((*order)[i - 1], (*order)[j]);
    }
}

// pad_id: -1 for a stream of tokens; a token id for one document per row padded with it (see the top)
inline void dataloader_init(DataLoader* loader, const char* pattern, int B, int T, int vocab_size, int pad_id = -1) {
    if (B < 1 || T < 1) fail("dataloader: B and T must be at least 1, got B=%d, T=%d", B, T);
    if (vocab_size < 1) fail("dataloader: vocab_size must be at least 1, got %d", vocab_size);
    if (pad_id < -1 || pad_id >= vocab_size) fail("dataloader: the padding token %d is not in the vocabulary [0, %d)", pad_id, vocab_size);
    loader->B = B;
    loader->T = T;
    loader->vocab_size = vocab_size;
    loader->pad_id = pad_id;

    glob_t matches;
    int rc = glob(pattern, 0, nullptr, &matches);
    if (rc == GLOB_NOMATCH) fail("dataloader: no files match '%s'", pattern);
    if (rc != 0) fail("dataloader: glob failed for '%s' (error %d)", pattern, rc);
    loader->shard_paths.assign(matches.gl_pathv, matches.gl_pathv + matches.gl_pathc);
    globfree(&matches);
    // glob sorts with strcoll, which depends on the locale; byte order is the same everywhere
    std::sort(loader->shard_paths.begin(), loader->shard_paths.end());

    loader->shard_tokens.clear();
    loader->shard_token_bytes.clear();
    for (const std::string& path : loader->shard_paths) {
        int token_bytes = 0;
        loader->shard_tokens.push_back(dataloader_check_shard(path.c_str(), B, T, pad_id >= 0, &token_bytes));
        loader->shard_token_bytes.push_back(token_bytes);
    }

    size_t BT = (size_t)B * T;
    loader->inputs = (int*)malloc_or_fail(BT * sizeof(int), "dataloader inputs");
    loader->targets = (int*)malloc_or_fail(BT * sizeof(int), "dataloader targets");
    loader->read_buffer = (unsigned char*)malloc_or_fail((BT + 1) * 4, "dataloader read buffer");
    loader->file = nullptr;
    loader->file_shard = -1;
    dataloader_reset(loader);
}

inline size_t dataloader_num_batches(const DataLoader* loader) {
    size_t total = 0;
    for (size_t s = 0; s < loader->shard_paths.size(); s++) total += dataloader_shard_batches(loader, (int)s);
    return total;
}

inline void dataloader_next_batch(DataLoader* loader) {
    int shard = loader->shard_index;
    // the position may have been restored from a checkpoint made with other shards or B, T
    if (shard < 0 || shard >= (int)loader->shard_paths.size()) {
        fail("dataloader: shard_index %d is out of range (%zu shards)", shard, loader->shard_paths.size());
    }
    if (loader->batch_index >= dataloader_shard_batches(loader, shard)) {
        fail("dataloader: batch_index %zu is out of range for '%s' (%zu batches)", loader->batch_index,
             loader->shard_paths[shard].c_str(), dataloader_shard_batches(loader, shard));
    }
    size_t batch = loader->batch_index;
    if (loader->shuffled) {
        // visit k of the epoch reads batch order[k], numbered through the shards
        if (loader->order_epoch != loader->epoch) {
            dataloader_shuffled_order(&loader->order, dataloader_num_batches(loader), loader->shuffle_seed, loader->epoch);
            loader->order_epoch = loader->epoch;
        }
        size_t visit = loader->batch_index;
        for (int s = 0; s < shard; s++) visit += dataloader_shard_batches(loader, s);
        batch = loader->order[visit];
        shard = 0;
        while (batch >= dataloader_shard_batches(loader, shard)) batch -= dataloader_shard_batches(loader, shard++);
    }
    const char* path = loader->shard_paths[shard].c_str();
    if (loader->file_shard != shard) {
        if (loader->file != nullptr) fclose(loader->file);
        loader->file = fopen_or_fail(path, "rb");
        loader->file_shard = shard;
    }

    size_t BT = (size_t)loader->B * loader->T;
    const bool rows = loader->pad_id >= 0;
    size_t window = rows ? BT : BT + 1;   // a stream's last target is the next batch's first input
    int token_bytes = loader->shard_token_bytes[shard];
    size_t first_token = batch * BT;
    off_t offset = (off_t)DATALOADER_HEADER_BYTES + (off_t)(first_token * token_bytes);
    if (fseeko(loader->file, offset, SEEK_SET) != 0) fail("cannot seek in '%s': %s", path, strerror(errno));
    size_t got = fread(loader->read_buffer, token_bytes, window, loader->file);
    // init checked the size, so a short read here means the file changed or the disk failed
    if (got != window) {
        fail("cannot read tokens %zu..%zu of '%s': %s", first_token, first_token + window - 1, path,
             ferror(loader->file) ? strerror(errno) : "file ended early (was it changed after init?)");
    }

    // the window: token i is input i and, but where a row ends, target i-1
    const size_t T = (size_t)loader->T;
    for (size_t i = 0; i < window; i++) {
        const unsigned char* p = loader->read_buffer + i * token_bytes;
        uint32_t token = token_bytes == 2 ? (uint32_t)p[0] | ((uint32_t)p[1] << 8)
                                          : (uint32_t)dataloader_read_le_int32(p);
        if (token >= (uint32_t)loader->vocab_size) {
            fail("'%s': token at position %zu is %u, not below vocab_size %d", path, first_token + i,
                 token, loader->vocab_size);
        }
        if (i < BT) loader->inputs[i] = (int)token;
        if (i == 0) continue;
        if (!rows) loader->targets[i - 1] = (int)token;
        // one document per row: a row's first token is no target of the row before, nor is padding
        else loader->targets[i - 1] = i % T == 0 || (int)token == loader->pad_id ? IGNORED_TARGET : (int)token;
    }
    if (rows) loader->targets[BT - 1] = IGNORED_TARGET;   // the last row's end

    // the next visit; after the last shard's last batch, the next epoch
    loader->batch_index++;
    if (loader->batch_index >= dataloader_shard_batches(loader, loader->shard_index)) {
        loader->batch_index = 0;
        loader->shard_index = (loader->shard_index + 1) % (int)loader->shard_paths.size();
        if (loader->shard_index == 0) loader->epoch++;
    }
}

inline void dataloader_free(DataLoader* loader) {
    if (loader->file != nullptr) fclose(loader->file);
    loader->file = nullptr;
    loader->file_shard = -1;
    free(loader->inputs);
    free(loader->targets);
    free(loader->read_buffer);
    loader->inputs = nullptr;
    loader->targets = nullptr;
    loader->read_buffer = nullptr;
    loader->shard_paths.clear();
    loader->shard_tokens.clear();
    loader->shard_token_bytes.clear();
}
