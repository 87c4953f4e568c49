// cuda_emu_internal.h -- the state the two halves of the emulator's runtime
// share: the scheduler (cuda_emu_runtime.cpp: fibers, barriers, launches) and
// the sanitizer (cuda_emu_sanitizer.cpp: Regions, shadow memory, messages).
// Kernel code never sees this file; it sees cuda_emu.h.
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <memory>
#include <string>
#include <vector>

#include "cuda_emu.h"

namespace emu {

constexpr size_t STATIC_SHARED_LIMIT = 48 * 1024;  // CUDA's limit without an opt-in
constexpr int MAX_SHARED_VARS = 256;

enum State { READY, BLOCK_BARRIER, WARP_BARRIER, DONE };
enum Schedule { FORWARD = 0, REVERSED = 1, RANDOM = 2 };

struct Fiber {
    ThreadView view;     // what kernel code reads: tl_thread points here
    ucontext_t ctx;      // how it starts
    jmp_buf jb;          // where it continues after a barrier
    bool started;
    State state;
    unsigned wait_mask;  // the mask of the warp operation it waits in
    int line;            // the source line of the barrier it waits at
};

// One access remembered by the race tracker. thread: 1 + the thread's linear
// index in its block (shared memory) or in the launch (global memory); 0: none.
// stamp: the block's clock when it happened (see Worker::clock).
struct Access {
    long long thread;
    unsigned long long stamp;
    int line;
};
struct SharedCell {
    Access w, r1, r2;  // the last write; the last two reads by different threads
};
struct FreeDeleter {
    void operator()(void* p) const { free(p); }
};

// An array a kernel reaches through a checked pointer: a pointer argument (as
// large as the NumPy array passed) or a __shared__ array of one block.
// (base, bytes and shadowed are in cuda_emu.h's Region.)
struct RegionState : Region {
    const char* name = "";
    const char* type = "";      // dtype ("float32") or declared element type ("real")
    size_t elem = 1;            // the size of one element (the shadow's granule)
    bool shared = false, dynamic = false;
    int ndims = 0;
    long long dims[8] = {0};     // a shared array's declared dimensions
    unsigned char* init = nullptr;  // initcheck: 1 per written byte; null: all initialised
    std::vector<unsigned char> init_store;  // (shared arrays own theirs)
    std::unique_ptr<Access, FreeDeleter> gcells;      // racecheck, global: last write per element
    std::unique_ptr<SharedCell, FreeDeleter> scells;  // racecheck, shared
};

// One OS thread running blocks one after another.
struct Worker {
    BlockView view;      // what kernel code reads: tl_block points here
    const Launch* launch = nullptr;
    unsigned checks = 0;
    long long block_linear = 0;
    std::vector<Fiber> fibers;
    std::vector<int> order;  // the order in which fibers are resumed in this round
    char* stacks = nullptr;  // n slots of [guard page | stack]
    size_t stack_stride = 0, stack_size = 0, stacks_total = 0;
    jmp_buf sched_jb;
    ucontext_t sched_ctx;
    alignas(16) unsigned char static_shared[STATIC_SHARED_LIMIT];
    size_t static_used = 0;
    void* slot[MAX_SHARED_VARS];
    RegionState shared_region[MAX_SHARED_VARS];
    std::vector<unsigned char> dynamic_shared;
    RegionState dynamic_region;
    std::vector<uint64_t> xchg[2];
    std::string error;

    // The race tracker's happens-before: every barrier release ticks `clock`;
    // an access stamped before the latest release that both threads took part
    // in is ordered before anything they do now. block_sync: the latest
    // __syncthreads (or the block's start); warp_full[w]: the latest warp
    // operation of every lane of warp w; pair_sync[t * 32 + lane]: the latest
    // one thread t shared with that lane of its warp (partial masks).
    unsigned long long clock = 0, block_sync = 0;
    std::vector<unsigned long long> warp_full, pair_sync;
    bool pair_used = false;
    // An index outside its declared dimension, reported at the access.
    struct {
        RegionState* region;
        int rank, line;
        long long index, extent;
    } bad{};
};

Worker* worker();
Fiber* fiber();
void fail(Worker* w, const std::string& msg);
// Stop this fiber for good after fail(): the launch is abandoned.
[[noreturn]] void abandon(Worker* w);

// Text for messages.
std::string block_name(const BlockView& v, long long linear);
std::string thread_name(const BlockView& v, int linear);
std::string thread_ranges(const std::vector<int>& threads);
std::string at_line(Worker* w, int line);

// The sanitizer's part of a launch and of a block.
void make_arg_regions(const Launch& L, unsigned checks, std::vector<RegionState>& regions,
                      std::vector<Region*>& table);
void start_block_shadow(Worker* w);
// A __shared__ array got its storage in a new block: nothing written yet.
void reset_shared_region(Worker* w, RegionState& r, void* base, size_t bytes, size_t elem,
                         const char* name, const char* type, int ndims, const long long* dims);

}  // namespace emu
