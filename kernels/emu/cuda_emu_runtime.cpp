// cuda_emu_runtime.cpp -- the scheduler behind cuda_emu.h: runs a kernel
// launch on the CPU, block by block, with a block's threads as fibers.
// (The memory checks are in cuda_emu_sanitizer.cpp.)
//
// How a launch runs:
//   - blocks run one after another on each of `workers` OS threads, which
//     take block indices from a shared counter; a launch with a memory check
//     on (memcheck, racecheck, initcheck) or a permuted schedule runs on one
//     OS thread, so that its shadow state needs no locks and its first error
//     is the same in every run;
//   - the threads of a block are cooperative fibers, each with its own stack
//     (an inaccessible guard page below it turns an overflow into a crash, not
//     corruption). A fiber is started with ucontext (makecontext/setcontext)
//     and afterwards switched with _setjmp/_longjmp, which skip the
//     signal-mask system calls of swapcontext; define EMU_SWAPCONTEXT to use
//     swapcontext throughout. A fiber runs until it parks at a barrier or
//     returns;
//   - the schedule: between two barriers the ready fibers are resumed in
//     thread-index order, in reversed order, or in a seeded random order
//     (Options::schedule; blocks are taken in the same kind of order), so a
//     result that depends on the order of unsynchronised threads changes;
//   - __syncthreads: when every fiber of the block that has not returned is
//     parked there, all are released. A thread that returns early leaves the
//     barrier count, as on Volta and later GPUs. With synccheck, threads
//     released together must wait at the same __syncthreads call (else the
//     launch fails naming the threads and lines: a barrier in a branch only
//     some threads take), and the lanes of a warp operation must name each
//     other with the same mask;
//   - warp operations: the lanes named by a waiting lane's mask are released
//     together when all of them have arrived; a mask naming a lane that has
//     returned is an error;
//   - if no fiber can move the launch fails with "deadlock" (which threads
//     wait where) instead of hanging;
//   - shared memory is per block and filled with 0xFF bytes (NaN as floats)
//     when the block starts;
//   - launches the GPU would refuse (over 1024 threads, grid too large, over
//     48 KiB of shared memory) fail here too.
// Data races are found by the race tracker (cuda_emu_sanitizer.cpp) and, for
// what it cannot see, by running a kernel under the three schedules.
#include "cuda_emu_internal.h"

#undef _FORTIFY_SOURCE  // its longjmp check rejects jumps between fiber stacks
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <numeric>
#include <thread>

namespace emu {

thread_local ThreadView* tl_thread = nullptr;
thread_local BlockView* tl_block = nullptr;

// The runtime's own view of the same two objects.
static thread_local Worker* tl_worker = nullptr;
static thread_local Fiber* tl_fiber = nullptr;
Worker* worker() { return tl_worker; }
Fiber* fiber() { return tl_fiber; }

void fail(Worker* w, const std::string& msg) {
    if (w->error.empty()) w->error = msg;
}

std::string block_name(const BlockView& v, long long b) {
    return "(" + std::to_string(b % v.grid.x) + "," + std::to_string(b / v.grid.x % v.grid.y) +
           "," + std::to_string(b / ((long long)v.grid.x * v.grid.y)) + ")";
}

std::string thread_name(const BlockView& v, int i) {
    return "(" + std::to_string(unsigned(i) % v.block.x) + "," +
           std::to_string(unsigned(i) / v.block.x % v.block.y) + "," +
           std::to_string(unsigned(i) / (v.block.x * v.block.y)) + ")";
}

static std::string this_block(Worker* w) {
    return "block " + block_name(w->view, w->block_linear);
}

// "0-4, 7, 9-31" or "0, 2, ..., 62": sorted linear thread indices, in short.
std::string thread_ranges(const std::vector<int>& t) {
    std::string s;
    for (size_t i = 0; i < t.size();) {
        size_t j = i;
        int step = i + 1 < t.size() ? t[i + 1] - t[i] : 1;
        while (j + 1 < t.size() && t[j + 1] - t[j] == step) ++j;
        if (step != 1 && j < i + 2) j = i;  // two strided numbers are just listed
        std::string a = std::to_string(t[i]), b = std::to_string(t[j]);
        s += (s.empty() ? "" : ", ") +
             (j == i ? a : step == 1 ? a + "-" + b
                                     : a + ", " + std::to_string(t[i] + step) + ", ..., " + b);
        i = j + 1;
    }
    return s;
}

std::string at_line(Worker* w, int line) {
    if (line <= 0) return "";
    return std::string(" at ") + w->launch->options->file + ":" + std::to_string(line);
}

// ------------------------------------------------------------------ fibers
static void switch_to_scheduler(Fiber* f, Worker* w) {
#ifdef EMU_SWAPCONTEXT
    swapcontext(&f->ctx, &w->sched_ctx);
#else
    if (!_setjmp(f->jb)) _longjmp(w->sched_jb, 1);
#endif
}

void abandon(Worker* w) {
    fiber()->state = DONE;
    switch_to_scheduler(fiber(), w);  // never resumed: the launch is abandoned
    __builtin_unreachable();
}

void park(int wait, unsigned mask, int line) {
    Fiber* f = fiber();
    f->state = wait == AT_BLOCK_BARRIER ? BLOCK_BARRIER : WARP_BARRIER;
    f->wait_mask = mask;
    f->line = line;
    switch_to_scheduler(f, worker());
}

// A fiber runs the kernel once per block: after each run it parks as DONE
// and is resumed for the next block, so it is set up once per launch.
static void fiber_entry() {
    for (;;) {
        Worker* w = worker();
        w->launch->invoke(w->launch->fn, w->launch->args, w->launch->regions);
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
void* shared_slot(int id, size_t bytes, size_t align, size_t elem, const char* name,
                  const char* type, int ndims, const long long* dims, Region** region) {
    Worker* w = worker();
    if (id >= MAX_SHARED_VARS) {
        fail(w, "too many __shared__ variables in one file for the emulator");
        abandon(w);
    }
    void*& slot = w->slot[id];
    if (!slot) {
        align = std::max<size_t>(align, 16);
        size_t start = (w->static_used + align - 1) / align * align;
        if (start + bytes > STATIC_SHARED_LIMIT) {
            fail(w, "static __shared__ memory exceeds 48 KiB");
            abandon(w);
        }
        slot = w->static_shared + start;
        w->static_used = start + bytes;
        memset(slot, 0xFF, bytes);
        if (w->checks & (MEMCHECK | RACECHECK | INITCHECK))
            reset_shared_region(w, w->shared_region[id], slot, bytes, elem, name, type, ndims,
                                dims);
    }
    *region = w->checks & (MEMCHECK | RACECHECK | INITCHECK) ? &w->shared_region[id] : nullptr;
    return slot;
}

void* dynamic_shared_memory(size_t elem, const char* name, const char* type, Region** region) {
    Worker* w = worker();
    RegionState& r = w->dynamic_region;
    if (!*r.name) {  // the first `extern __shared__` name this launch asks for
        r.name = name;
        r.type = type;
        r.elem = elem;
    }
    *region = w->checks & (MEMCHECK | RACECHECK | INITCHECK) ? &r : nullptr;
    return w->dynamic_shared.data();
}

void trap() {
    Worker* w = worker();
    fail(w, "thread " + std::to_string(fiber()->view.linear) + " of " + this_block(w) +
                " called __trap()");
    abandon(w);
}

uint64_t* exchange_buffer(unsigned parity) { return worker()->xchg[parity & 1u].data(); }

unsigned lanes_alive(int base) {
    Worker* w = worker();
    unsigned m = 0;
    for (int j = 0; j < 32 && base + j < int(w->fibers.size()); ++j)
        if (w->fibers[base + j].state != DONE) m |= 1u << j;
    return m;
}

// --------------------------------------------------------------- barriers
static std::string hex(unsigned m) {
    char s[16];
    snprintf(s, sizeof s, "0x%08x", m);
    return s;
}

// A warp operation released lanes `group` of the warp at `base`: remember it
// for the race tracker (see Worker::clock).
static void record_warp_sync(Worker* w, int base, unsigned group, unsigned exist) {
    if (!(w->checks & RACECHECK)) return;
    unsigned long long now = ++w->clock;
    if (group == exist) {
        w->warp_full[base / 32] = now;
        return;
    }
    if (!w->pair_used) {
        std::fill(w->pair_sync.begin(), w->pair_sync.end(), 0ull);
        w->pair_used = true;
    }
    for (int i = 0; i < 32; ++i)
        if (group >> i & 1u)
            for (int j = 0; j < 32; ++j)
                if (group >> j & 1u) w->pair_sync[size_t(base + i) * 32 + j] = now;
}

static void fail_masks(Worker* w, int a, int b) {
    const Fiber &f = w->fibers[a], &o = w->fibers[b];
    fail(w, "synccheck: in " + this_block(w) + ", thread " + std::to_string(a) +
                " waits in a warp operation" + at_line(w, f.line) + " with mask " +
                hex(f.wait_mask) + ", thread " + std::to_string(b) + " in one" +
                at_line(w, o.line) + " with mask " + hex(o.wait_mask) +
                ": the lanes of a warp operation must pass the same mask");
}

// Release each group of waiting lanes whose mask has fully arrived at a warp
// barrier (lanes beyond the end of the block do not exist and are ignored).
// With synccheck, the lanes of a group must pass the same mask, and no other
// waiting lane may name one of them.
static bool release_warps(Worker* w) {
    int n = int(w->fibers.size());
    bool released = false, sync = w->checks & SYNCCHECK;
    for (int base = 0; base < n; base += 32) {
        int lanes = std::min(n, base + 32) - base;
        unsigned waiting = 0, done = 0;
        for (int j = 0; j < lanes; ++j) {
            State s = w->fibers[base + j].state;
            if (s == WARP_BARRIER) waiting |= 1u << j;
            if (s == DONE) done |= 1u << j;
        }
        unsigned exist = lanes == 32 ? ~0u : (1u << lanes) - 1;
        auto mask = [&](int j) { return w->fibers[base + j].wait_mask & exist; };
        for (int l = 0; l < lanes; ++l) {
            if (!(waiting >> l & 1u)) continue;
            const Fiber& f = w->fibers[base + l];
            unsigned group = mask(l);
            if (group & done) {
                int j = __builtin_ctz(group & done);
                fail(w, "synccheck: a warp operation" + at_line(w, f.line) + " in " +
                            this_block(w) + ": thread " + std::to_string(base + l) +
                            "'s mask " + hex(f.wait_mask) + " names thread " +
                            std::to_string(base + j) + ", which has returned");
                return false;
            }
            if (sync && !(group >> l & 1u)) {
                fail(w, "synccheck: thread " + std::to_string(base + l) + " of " +
                            this_block(w) + " calls a warp operation" + at_line(w, f.line) +
                            " with a mask " + hex(f.wait_mask) + " that leaves itself out");
                return false;
            }
            if (group & ~waiting) continue;  // someone named in the mask has not arrived yet
            group |= 1u << l;
            for (int j = 0; sync && j < lanes; ++j) {
                bool in = group >> j & 1u;
                if ((in && mask(j) != mask(l)) ||
                    (!in && (waiting >> j & 1u) && (mask(j) & group))) {
                    fail_masks(w, base + l, base + j);
                    return false;
                }
            }
            for (int j = 0; j < lanes; ++j)
                if (group >> j & 1u) w->fibers[base + j].state = READY;
            waiting &= ~group;
            record_warp_sync(w, base, group, exist);
            released = true;
        }
    }
    return released;
}

// The waiting threads grouped by the line they wait at: "threads 0-4 at
// k.cu:12, threads 5-63 at k.cu:14".
static std::string who_waits_where(Worker* w, State state) {
    std::vector<int> lines;
    for (auto& f : w->fibers)
        if (f.state == state && std::find(lines.begin(), lines.end(), f.line) == lines.end())
            lines.push_back(f.line);
    std::string s;
    for (int line : lines) {
        std::vector<int> t;
        for (int i = 0; i < int(w->fibers.size()); ++i)
            if (w->fibers[i].state == state && w->fibers[i].line == line) t.push_back(i);
        s += (s.empty() ? "" : ", ") + std::string(t.size() > 1 ? "threads " : "thread ") +
             thread_ranges(t) + at_line(w, line);
    }
    return s;
}

static bool release_block_barrier(Worker* w, int live) {
    int at_barrier = 0;
    for (auto& f : w->fibers) at_barrier += f.state == BLOCK_BARRIER;
    if (at_barrier != live) return false;
    if (w->checks & SYNCCHECK) {
        int line = -1;
        for (auto& f : w->fibers) {
            if (f.state != BLOCK_BARRIER) continue;
            if (line >= 0 && f.line != line) {
                fail(w, "synccheck: the threads of " + this_block(w) +
                            " wait at different __syncthreads calls (a barrier in code that "
                            "not every thread reaches): " + who_waits_where(w, BLOCK_BARRIER));
                return false;
            }
            line = f.line;
        }
    }
    for (auto& f : w->fibers)
        if (f.state == BLOCK_BARRIER) f.state = READY;
    w->block_sync = ++w->clock;
    return true;
}

static std::string describe_deadlock(Worker* w) {
    std::string s = "deadlock in " + this_block(w) + ": no thread can go on;";
    std::string at_block = who_waits_where(w, BLOCK_BARRIER);
    std::string at_warp = who_waits_where(w, WARP_BARRIER);
    std::vector<int> done;
    for (int i = 0; i < int(w->fibers.size()); ++i)
        if (w->fibers[i].state == DONE) done.push_back(i);
    if (!at_block.empty()) s += " waiting at __syncthreads: " + at_block + ";";
    if (!at_warp.empty()) s += " waiting in warp operations for lanes that never come: " +
                               at_warp + ";";
    if (!done.empty()) s += " returned: " + thread_ranges(done) + ";";
    s.pop_back();
    return (w->checks & SYNCCHECK ? "synccheck: " : "") + s;
}

// --------------------------------------------------------------- schedule
static uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// The order in which this round resumes the fibers.
static void order_round(Worker* w, unsigned long long round) {
    const Options& o = *w->launch->options;
    int n = int(w->order.size());
    if (o.schedule == RANDOM) {
        uint64_t s = o.seed * 0x2545f4914f6cdd1dull ^ uint64_t(w->block_linear) << 20 ^ round;
        std::iota(w->order.begin(), w->order.end(), 0);
        for (int i = n - 1; i > 0; --i) std::swap(w->order[i], w->order[splitmix(s) % (i + 1)]);
    } else if (round == 0) {  // fixed orders are set once per block
        for (int i = 0; i < n; ++i) w->order[i] = o.schedule == REVERSED ? n - 1 - i : i;
    }
}

// Block number k of the launch in schedule order: reversed, or an affine
// permutation k -> (a k + c) mod blocks with a coprime to blocks (seeded).
static long long block_of(const Options& o, long long k, long long blocks) {
    if (o.schedule == REVERSED) return blocks - 1 - k;
    if (o.schedule != RANDOM || blocks < 2) return k;
    uint64_t s = o.seed;
    unsigned long long a = splitmix(s) % blocks | 1, c = splitmix(s) % blocks;
    while (std::gcd(a, (unsigned long long)blocks) != 1) a += 2;
    return (long long)((unsigned __int128)(a % blocks) * k % blocks + c) % blocks;
}

static bool run_block(Worker* w) {
    int n = int(w->fibers.size());
    const dim3& b = w->view.block;
    w->static_used = 0;
    std::fill(std::begin(w->slot), std::end(w->slot), nullptr);
    std::fill(w->dynamic_shared.begin(), w->dynamic_shared.end(), 0xFF);
    for (auto& x : w->xchg) std::fill(x.begin(), x.end(), POISON);
    start_block_shadow(w);
    w->block_sync = ++w->clock;  // whatever earlier blocks did is not this block's business
    for (int i = 0; i < n; ++i) {
        Fiber& f = w->fibers[i];
        f.view.linear = i;
        f.view.tid = {unsigned(i) % b.x, unsigned(i) / b.x % b.y, unsigned(i) / (b.x * b.y)};
        f.view.warp_ops = 0;
        f.state = READY;
        f.line = 0;
    }
    int live = n;
    for (unsigned long long round = 0;; ++round) {
        order_round(w, round);
        for (int k = 0; k < n; ++k) {
            Fiber& f = w->fibers[w->order[k]];
            if (f.state != READY) continue;
            resume(w, f);
            if (f.state == DONE) --live;
            if (!w->error.empty()) return false;
        }
        if (live == 0) return true;
        if (release_block_barrier(w, live) || release_warps(w)) continue;
        if (!w->error.empty()) return false;
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
    w->checks = L.options->checks;
    w->view.block = L.block;
    w->view.grid = L.grid;
    int n = int(L.block.x * L.block.y * L.block.z);
    w->view.nthreads = n;
    w->fibers.resize(n);
    w->order.resize(n);
    w->dynamic_shared.resize(L.dynamic_shared);
    for (auto& x : w->xchg) x.resize(size_t((n + 31) / 32) * 32);
    if (w->checks & RACECHECK) {
        w->warp_full.assign((n + 31) / 32, 0ull);
        w->pair_sync.assign(size_t(n) * 32, 0ull);
    }
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
    Worker* saved_worker = tl_worker;
    tl_block = &w->view;
    tl_worker = w;
    long long blocks = (long long)L.grid.x * L.grid.y * L.grid.z;
    while (!failed->load()) {
        long long k = next->fetch_add(1);
        if (k >= blocks) break;
        long long b = block_of(*L.options, k, blocks);
        w->block_linear = b;
        w->view.block_idx = {unsigned(b % L.grid.x), unsigned(b / L.grid.x % L.grid.y),
                             unsigned(b / ((long long)L.grid.x * L.grid.y))};
        if (!run_block(w)) {
            if (!failed->exchange(true)) *error = w->error;
            break;
        }
    }
    tl_block = saved_block;
    tl_thread = saved_thread;
    tl_worker = saved_worker;
    munmap(w->stacks, w->stacks_total);
    delete w;
}

int run_launch(const Launch& launch, char* err, int errlen) {
    Launch L = launch;
    const Options& o = *L.options;
    std::string error = check_launch(L);
    std::vector<RegionState> regions;
    std::vector<Region*> table;
    make_arg_regions(L, o.checks, regions, table);
    L.regions = table.data();
    if (error.empty()) {
        std::atomic<long long> next{0};
        std::atomic<bool> failed{false};
        long long blocks = (long long)L.grid.x * L.grid.y * L.grid.z;
        bool one = (o.checks & (MEMCHECK | RACECHECK | INITCHECK)) || o.schedule != FORWARD;
        int workers = int(std::max(1LL, std::min<long long>(one ? 1 : o.workers, blocks)));
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
