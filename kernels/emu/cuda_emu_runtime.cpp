// cuda_emu_runtime.cpp -- the scheduler behind cuda_emu.h: runs a kernel
// launch on the CPU, block by block, with a block's threads as fibers.
//
// How a launch runs:
//   - blocks run one after another on each of `workers` OS threads, which
//     take block indices from a shared counter;
//   - the threads of a block are cooperative fibers, each with its own stack
//     (an inaccessible guard page below it turns an overflow into a crash, not
//     corruption). A fiber is started with ucontext (makecontext/setcontext)
//     and afterwards switched with _setjmp/_longjmp, which skip the
//     signal-mask system calls of swapcontext; define EMU_SWAPCONTEXT to use
//     swapcontext throughout. A fiber runs until it parks at a barrier or
//     returns;
//   - __syncthreads: when every fiber of the block that has not returned is
//     parked there, all are released. A thread that returns early leaves the
//     barrier count, as on Volta and later GPUs. Threads released together
//     must wait at the same __syncthreads call, else the launch fails (a
//     barrier in a branch only some threads take);
//   - warp operations: a warp's waiting lanes are released when every live
//     lane named in their masks has arrived; a mask naming a lane that has
//     returned is an error;
//   - if no fiber can move the launch fails with "deadlock" instead of hanging;
//   - shared memory is per block and filled with 0xFF bytes (NaN as floats)
//     when the block starts, so reading it before writing it shows up;
//   - launches the GPU would refuse (over 1024 threads, grid too large, over
//     48 KiB of shared memory) fail here too.
// Between barriers fibers run one at a time, so data races are NOT detected.
#include "cuda_emu.h"

#undef _FORTIFY_SOURCE  // its longjmp check rejects jumps between fiber stacks
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

namespace emu {

constexpr size_t STATIC_SHARED_LIMIT = 48 * 1024;  // CUDA's limit without an opt-in
constexpr int MAX_SHARED_VARS = 256;

enum State { READY, BLOCK_BARRIER, WARP_BARRIER, DONE };

struct Fiber {
    ThreadView view;     // what kernel code reads: tl_thread points here
    ucontext_t ctx;      // how it starts
    jmp_buf jb;          // where it continues after a barrier
    bool started;
    State state;
    unsigned wait_mask;  // the mask of the warp operation it waits in
    const void* site;    // the __syncthreads call it waits at
};

// One OS thread running blocks one after another.
struct Worker {
    BlockView view;      // what kernel code reads: tl_block points here
    const Launch* launch = nullptr;
    std::vector<Fiber> fibers;
    char* stacks = nullptr;  // n slots of [guard page | stack]
    size_t stack_stride = 0, stack_size = 0, stacks_total = 0;
    jmp_buf sched_jb;
    ucontext_t sched_ctx;
    alignas(16) unsigned char static_shared[STATIC_SHARED_LIMIT];
    size_t static_used = 0;
    void* slot[MAX_SHARED_VARS];
    std::vector<unsigned char> dynamic_shared;
    std::vector<uint64_t> xchg[2];
    std::string error;
};

thread_local ThreadView* tl_thread = nullptr;
thread_local BlockView* tl_block = nullptr;

// The runtime's own view of the same two objects.
static thread_local Worker* tl_worker = nullptr;
static thread_local Fiber* tl_fiber = nullptr;
static Worker* worker() { return tl_worker; }
static Fiber* fiber() { return tl_fiber; }

static void fail(Worker* w, const std::string& msg) {
    if (w->error.empty()) w->error = msg;
}

static std::string block_name(Worker* w) {
    const uint3& b = w->view.block_idx;
    return "block (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," +
           std::to_string(b.z) + ")";
}

// ------------------------------------------------------------------ fibers
static void switch_to_scheduler(Fiber* f, Worker* w) {
#ifdef EMU_SWAPCONTEXT
    swapcontext(&f->ctx, &w->sched_ctx);
#else
    if (!_setjmp(f->jb)) _longjmp(w->sched_jb, 1);
#endif
}

void park(int wait, unsigned mask, const void* site) {
    Fiber* f = fiber();
    f->state = wait == AT_BLOCK_BARRIER ? BLOCK_BARRIER : WARP_BARRIER;
    f->wait_mask = mask;
    f->site = site;
    switch_to_scheduler(f, worker());
}

// A fiber runs the kernel once per block: after each run it parks as DONE
// and is resumed for the next block, so it is set up once per launch.
static void fiber_entry() {
    for (;;) {
        Worker* w = worker();
        w->launch->invoke(w->launch->fn, w->launch->args);
        fiber()->state = DONE;
        switch_to_scheduler(fiber(), w);
    }
}

// Run fiber f until it parks or returns.
static void resume(Worker* w, Fiber& f) {
    tl_thread = &f.view;
    tl_fiber = &f;
#ifdef EMU_SWAPCONTEXT
    swapcontext(&w->sched_ctx, &f.ctx);
#else
    if (!_setjmp(w->sched_jb)) {
        if (!f.started) {
            f.started = true;
            setcontext(&f.ctx);
        }
        _longjmp(f.jb, 1);
    }
#endif
}

// -------------------------------------------------------- what kernels ask
void* shared_slot(int id, size_t bytes, size_t align) {
    Worker* w = worker();
    if (id >= MAX_SHARED_VARS) {
        fail(w, "too many __shared__ variables in one file for the emulator");
        fiber()->state = DONE;
        switch_to_scheduler(fiber(), w);  // never resumed: the launch is abandoned
    }
    void*& slot = w->slot[id];
    if (!slot) {
        align = std::max<size_t>(align, 16);
        size_t start = (w->static_used + align - 1) / align * align;
        if (start + bytes > STATIC_SHARED_LIMIT) {
            fail(w, "static __shared__ memory exceeds 48 KiB");
            fiber()->state = DONE;
            switch_to_scheduler(fiber(), w);
        }
        slot = w->static_shared + start;
        w->static_used = start + bytes;
        memset(slot, 0xFF, bytes);
    }
    return slot;
}

void trap() {
    Worker* w = worker();
    fail(w, "thread " + std::to_string(fiber()->view.linear) + " of " + block_name(w) +
                " called __trap()");
    fiber()->state = DONE;
    switch_to_scheduler(fiber(), w);  // never resumed: the launch is abandoned
    __builtin_unreachable();
}

void* dynamic_shared_memory() { return worker()->dynamic_shared.data(); }

uint64_t* exchange_buffer(unsigned parity) { return worker()->xchg[parity & 1u].data(); }

unsigned lanes_alive(int base) {
    Worker* w = worker();
    unsigned m = 0;
    for (int j = 0; j < 32 && base + j < int(w->fibers.size()); ++j)
        if (w->fibers[base + j].state != DONE) m |= 1u << j;
    return m;
}

// --------------------------------------------------------------- barriers
// Release the waiting lanes of each warp whose masks are fully present at a
// warp barrier (lanes beyond the end of the block do not exist and are ignored).
static bool release_warps(Worker* w) {
    int n = int(w->fibers.size());
    bool released = false;
    for (int base = 0; base < n; base += 32) {
        int end = std::min(n, base + 32);
        unsigned waiting = 0, done = 0, need = 0;
        for (int i = base; i < end; ++i) {
            const Fiber& f = w->fibers[i];
            if (f.state == WARP_BARRIER) {
                waiting |= 1u << (i - base);
                need |= f.wait_mask;
            }
            if (f.state == DONE) done |= 1u << (i - base);
        }
        if (!waiting) continue;
        unsigned exist = end - base == 32 ? ~0u : (1u << (end - base)) - 1;
        need &= exist;
        if (need & done) {
            int j = __builtin_ctz(need & done);
            fail(w, "a warp operation in " + block_name(w) + " names thread " +
                        std::to_string(base + j) + " in its mask, which has returned");
            return false;
        }
        if (need & ~waiting) continue;  // someone named in a mask has not arrived yet
        for (int i = base; i < end; ++i)
            if (waiting >> (i - base) & 1u) w->fibers[i].state = READY;
        released = true;
    }
    return released;
}

static bool release_block_barrier(Worker* w, int live) {
    int at_barrier = 0;
    for (auto& f : w->fibers) at_barrier += f.state == BLOCK_BARRIER;
    if (at_barrier != live) return false;
    const void* site = nullptr;
    for (auto& f : w->fibers) {
        if (f.state != BLOCK_BARRIER) continue;
        if (site && f.site != site) {
            fail(w, "threads of " + block_name(w) +
                        " wait at different __syncthreads calls (a barrier in divergent code)");
            return false;
        }
        site = f.site;
        f.state = READY;
    }
    return true;
}

static std::string describe_deadlock(Worker* w) {
    int at_block = 0, at_warp = 0, done = 0;
    for (auto& f : w->fibers) {
        at_block += f.state == BLOCK_BARRIER;
        at_warp += f.state == WARP_BARRIER;
        done += f.state == DONE;
    }
    return "deadlock in " + block_name(w) + ": " + std::to_string(at_block) +
           " threads at __syncthreads, " + std::to_string(at_warp) + " in warp operations, " +
           std::to_string(done) + " returned";
}

static bool run_block(Worker* w) {
    int n = int(w->fibers.size());
    const dim3& b = w->view.block;
    w->static_used = 0;
    std::fill(std::begin(w->slot), std::end(w->slot), nullptr);
    std::fill(w->dynamic_shared.begin(), w->dynamic_shared.end(), 0xFF);
    for (auto& x : w->xchg) std::fill(x.begin(), x.end(), POISON);
    for (int i = 0; i < n; ++i) {
        Fiber& f = w->fibers[i];
        f.view.linear = i;
        f.view.tid = {unsigned(i) % b.x, unsigned(i) / b.x % b.y, unsigned(i) / (b.x * b.y)};
        f.view.warp_ops = 0;
        f.state = READY;
    }
    int live = n;
    while (true) {
        for (int i = 0; i < n; ++i) {
            Fiber& f = w->fibers[i];
            if (f.state != READY) continue;
            resume(w, f);
            if (f.state == DONE) --live;
            if (!w->error.empty()) return false;
        }
        if (live == 0) return true;
        if (release_block_barrier(w, live) || release_warps(w)) continue;
        fail(w, describe_deadlock(w));
        return false;
    }
}

// ---------------------------------------------------------------- launches
static std::string check_launch(const Launch& L) {
    long long threads = (long long)L.block.x * L.block.y * L.block.z;
    if (!L.block.x || !L.block.y || !L.block.z || !L.grid.x || !L.grid.y || !L.grid.z)
        return "grid and block dimensions must be at least 1";
    if (threads > 1024 || L.block.z > 64)
        return "a block of " + std::to_string(threads) +
               " threads: CUDA allows at most 1024 (and blockDim.z <= 64)";
    if (L.grid.x > 2147483647u || L.grid.y > 65535u || L.grid.z > 65535u)
        return "grid too large: CUDA allows gridDim.x < 2^31, gridDim.y and .z <= 65535";
    if (L.dynamic_shared > STATIC_SHARED_LIMIT)
        return "dynamic shared memory of " + std::to_string(L.dynamic_shared) +
               " bytes needs an opt-in on the GPU (over 48 KiB)";
    return "";
}

static void run_blocks(const Launch& L, std::atomic<long long>* next, std::atomic<bool>* failed,
                       std::string* error) {
    Worker* w = new Worker();
    w->launch = &L;
    w->view.block = L.block;
    w->view.grid = L.grid;
    int n = int(L.block.x * L.block.y * L.block.z);
    w->view.nthreads = n;
    w->fibers.resize(n);
    w->dynamic_shared.resize(L.dynamic_shared);
    for (auto& x : w->xchg) x.resize(size_t((n + 31) / 32) * 32);
    long page = sysconf(_SC_PAGESIZE);
    w->stack_size = (L.stack_bytes + page - 1) / page * page;
    w->stack_stride = w->stack_size + page;
    w->stacks_total = w->stack_stride * n;
    w->stacks = (char*)mmap(nullptr, w->stacks_total, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (w->stacks == MAP_FAILED) {
        if (!failed->exchange(true)) *error = "could not map the fiber stacks";
        delete w;
        return;
    }
    for (int i = 0; i < n; ++i) {
        mprotect(w->stacks + size_t(i) * w->stack_stride, page, PROT_NONE);
        Fiber& f = w->fibers[i];
        f.started = false;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = w->stacks + size_t(i) * w->stack_stride + page;
        f.ctx.uc_stack.ss_size = w->stack_size;
        f.ctx.uc_link = nullptr;  // fiber_entry never returns
        makecontext(&f.ctx, fiber_entry, 0);
    }
    BlockView* saved_block = tl_block;
    ThreadView* saved_thread = tl_thread;
    tl_block = &w->view;
    tl_worker = w;
    long long blocks = (long long)L.grid.x * L.grid.y * L.grid.z;
    while (!failed->load()) {
        long long b = next->fetch_add(1);
        if (b >= blocks) break;
        w->view.block_idx = {unsigned(b % L.grid.x), unsigned(b / L.grid.x % L.grid.y),
                             unsigned(b / ((long long)L.grid.x * L.grid.y))};
        if (!run_block(w)) {
            if (!failed->exchange(true)) *error = w->error;
            break;
        }
    }
    tl_block = saved_block;
    tl_thread = saved_thread;
    munmap(w->stacks, w->stacks_total);
    delete w;
}

int run_launch(const Launch& L, int workers, char* err, int errlen) {
    std::string error = check_launch(L);
    if (error.empty()) {
        std::atomic<long long> next{0};
        std::atomic<bool> failed{false};
        long long blocks = (long long)L.grid.x * L.grid.y * L.grid.z;
        workers = int(std::max(1LL, std::min<long long>(workers, blocks)));
        if (workers == 1) {
            run_blocks(L, &next, &failed, &error);
        } else {
            std::vector<std::string> errors(workers);
            std::vector<std::thread> pool;
            for (int i = 0; i < workers; ++i)
                pool.emplace_back(run_blocks, std::cref(L), &next, &failed, &errors[i]);
            for (auto& t : pool) t.join();
            for (auto& e : errors)
                if (!e.empty()) { error = e; break; }
        }
    }
    if (error.empty()) return 0;
    snprintf(err, errlen, "%s", error.c_str());
    return 1;
}

}  // namespace emu
