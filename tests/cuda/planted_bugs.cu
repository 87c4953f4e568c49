// planted_bugs.cu -- kernels with one planted bug each, for the emulator's
// sanitizer (tests/cuda/test_sanitizer.py), beside clean look-alikes that must
// pass every check. A comment "// @name" marks the line a message must name.

// A missing __syncthreads between writing s and reading a neighbour's value:
// thread t reads what thread t - 1 wrote (a higher thread reads a lower one's).
extern "C" __global__ void missing_barrier(const float* x, float* y) {
    __shared__ float s[64];
    int t = threadIdx.x;
    s[t] = x[t];                     // @raw_write
    y[t] = t > 0 ? s[t - 1] : 0.f;   // @raw_read
}

// The same with the barrier: clean.
extern "C" __global__ void with_barrier(const float* x, float* y) {
    __shared__ float s[64];
    int t = threadIdx.x;
    s[t] = x[t];
    __syncthreads();
    y[t] = t > 0 ? s[t - 1] : 0.f;
}

// Write-after-read: each thread reads its right neighbour, then overwrites its
// own element, which its left neighbour reads, with no barrier in between.
extern "C" __global__ void write_after_read(float* y) {
    __shared__ float s[64];
    int t = threadIdx.x;
    s[t] = float(t);
    __syncthreads();
    float v = s[(t + 1) % 64];       // @war_read
    s[t] = 2 * v;                    // @war_write
    y[t] = v;
}

// An off-by-one bound: `i <= n` reads (and writes) one element past the end.
extern "C" __global__ void read_past_end(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i < n ? i : 0] = x[i];    // @read_past_end
}
extern "C" __global__ void write_past_end(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = x[i < n ? i : 0];    // @write_past_end
}

// Reads far outside the array (x + offset).
extern "C" __global__ void read_far(const float* x, float* y, int offset) {
    y[threadIdx.x] = x[threadIdx.x + offset];    // @read_far
}

// A shared index one past a declared dimension.
extern "C" __global__ void shared_row_past_end(float* y) {
    __shared__ float t[8][33];
    t[threadIdx.x][0] = 1.f;                     // @row_past_end
    __syncthreads();
    y[threadIdx.x] = t[threadIdx.x % 8][0];
}
extern "C" __global__ void shared_column_past_end(float* y) {
    __shared__ float t[8][33];
    t[0][threadIdx.x] = 1.f;                     // @column_past_end
    y[threadIdx.x] = 0.f;
}

// Dynamic shared memory indexed past the launch's shared_mem bytes.
extern "C" __global__ void dynamic_past_end(float* y) {
    extern __shared__ float dyn[];
    dyn[threadIdx.x] = 1.f;                      // @dynamic_past_end
    y[threadIdx.x] = 0.f;
}

// Half the threads write s; every thread reads the mirror element.
extern "C" __global__ void uninitialised_shared(float* y) {
    __shared__ float s[64];
    if (threadIdx.x < 32) s[threadIdx.x] = 1.f;
    __syncthreads();
    y[threadIdx.x] = s[63 - threadIdx.x];        // @uninitialised_read
}

// A barrier inside a divergent branch: even and odd threads wait at
// different __syncthreads calls (on a GPU this is undefined behaviour).
extern "C" __global__ void barrier_in_branch(const float* x, float* y) {
    __shared__ float s[64];
    int t = threadIdx.x;
    if (t % 2 == 0) {
        s[t] = x[t];
        __syncthreads();                         // @even_barrier
    } else {
        s[t] = -x[t];
        __syncthreads();                         // @odd_barrier
    }
    y[t] = s[t ^ 1];
}

// A grid-stride loop with an off-by-one bound: the last element is never written.
extern "C" __global__ void fill_but_last(float* y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n - 1; i += gridDim.x * blockDim.x)
        y[i] = float(i);
}
extern "C" __global__ void fill(float* y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        y[i] = float(i);
}

// Reads y[0..n): what an earlier launch wrote, or did not.
extern "C" __global__ void copy(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];                      // @copy_read
}

// Every thread of every block writes y[0].
extern "C" __global__ void all_write_one(float* y) {
    y[0] = float(threadIdx.x);                   // @all_write_one
}

// Block 1 reads what block 0 writes in the same launch.
extern "C" __global__ void block_reads_other_block(float* y, float* z) {
    if (blockIdx.x == 0)
        y[threadIdx.x] = 1.f;                    // @other_block_write
    else
        z[threadIdx.x] = y[threadIdx.x];         // @other_block_read
}

// Within one block a barrier orders global memory too: clean.
extern "C" __global__ void global_through_barrier(float* y, float* z) {
    y[threadIdx.x] = float(threadIdx.x);
    __syncthreads();
    z[threadIdx.x] = y[blockDim.x - 1 - threadIdx.x];
}

// Sum of a block by warp shuffles, then across warps in shared memory: clean.
extern "C" __global__ void shuffle_sum(const float* x, float* y) {
    __shared__ float part[32];
    float v = x[blockIdx.x * blockDim.x + threadIdx.x];
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float w = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.f;
        for (int off = 16; off > 0; off /= 2) w += __shfl_xor_sync(0xffffffffu, w, off);
        if (threadIdx.x == 0) y[blockIdx.x] = w;
    }
}

// A tree sum of one warp in shared memory, ordered by __syncwarp: clean.
extern "C" __global__ void syncwarp_sum(const float* x, float* y) {
    __shared__ float s[32];
    int t = threadIdx.x;
    s[t] = x[t];
    __syncwarp();
    for (int off = 16; off > 0; off /= 2) {
        float v = t < off ? s[t + off] : 0.f;
        __syncwarp();
        if (t < off) s[t] += v;
        __syncwarp();
    }
    if (t == 0) y[0] = s[0];
}

// The same tree without __syncwarp ("warp-synchronous" code from before
// Volta): a race, since the lanes of a warp need not run in lockstep.
extern "C" __global__ void unsynced_warp_sum(const float* x, float* y) {
    __shared__ float s[32];
    int t = threadIdx.x;
    s[t] = x[t];                                 // @unsynced_write
    for (int off = 16; off > 0; off /= 2)
        if (t < off) s[t] += s[t + off];         // @unsynced_read
    if (t == 0) y[0] = s[0];
}

// Only the first half-warp takes part in the __syncwarp, so the second
// half's write and the first half's read are not ordered.
extern "C" __global__ void half_warp_sync(float* y) {
    __shared__ float s[32];
    int t = threadIdx.x;
    s[t] = float(t);                             // @half_write
    if (t < 16) {
        __syncwarp(0x0000ffffu);
        y[t] = s[t + 16];                        // @half_read
    } else {
        y[t] = 0.f;
    }
}

// Lanes that disagree about the mask of one shuffle.
extern "C" __global__ void mismatched_masks(float* y) {
    unsigned mask = threadIdx.x < 16 ? 0x0000ffffu : 0xffffffffu;
    y[threadIdx.x] = __shfl_down_sync(mask, float(threadIdx.x), 1);    // @mismatched_masks
}

// Atomics: counted from every thread (exempt from racecheck), and one past the end.
extern "C" __global__ void count(int* counter, float* total) {
    atomicAdd(counter, 1);
    atomicAdd(&total[0], 0.5f);
}
extern "C" __global__ void atomic_past_end(float* total, int n) {
    atomicAdd(&total[n], 1.f);                   // @atomic_past_end
}

// The result depends on which block runs first. Block 0 first: block 1 reads
// what block 0 wrote, a race racecheck reports. Block 1 first: a read before
// another block's write (write-after-read), which racecheck does not track in
// global memory; only the changed result under another schedule shows it.
extern "C" __global__ void order_dependent(float* y) {
    if (blockIdx.x == 1) y[1] = y[0] + 1.f;
    else y[0] = 10.f;
}
