// Runs a kernel launch on the host: blocks one after another, and within a block every
// thread as a fiber on the calling host thread. A fiber runs until it finishes or reaches
// a scheduling point (`__syncthreads()` or a warp shuffle), then the next fiber runs.
// A barrier opens when every live thread of the block (or, for a shuffle, of the warp)
// has reached it; threads that can never meet again (a barrier some live threads skip)
// stop the process with a message naming the kernel, since on a GPU that is a hang or
// undefined behaviour.
//
// The order threads run in between scheduling points is `KIMI_HYBRID_EMULATOR_SCHEDULE`:
// `forward` (the default), `reverse`, or `shuffle` (a new pseudo-random order each
// round). A kernel that reads what another thread wrote without a barrier between them
// gets different numbers under different orders, so the tests run under more than one.
//
// Fibers switch with a few instructions of x86-64 assembly (callee-saved registers and
// the stack pointer), so a kernel of a million threads runs in well under a second.

#include "cuda_emu.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

extern "C" void emu_switch(void** save_sp, void* next_sp);
asm(R"(
.text
.globl emu_switch
.hidden emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch, .-emu_switch
)");

namespace emu {

namespace {

constexpr size_t STACK = 64 * 1024;
constexpr unsigned MAX_THREADS = 1024;

enum State { RUNNABLE, AT_BARRIER, AT_SHUFFLE, DONE };

struct Fiber {
    void* sp = nullptr;
    State state = DONE;
    dim3 idx{};
    uint64_t value = 0;  // shuffle: the value offered, then the value received
    int kind = 0, arg = 0;
};

struct Block {
    const char* kernel = nullptr;
    void* fn = nullptr;
    Launcher launcher = nullptr;
    void** params = nullptr;
    dim3 grid{}, block{}, block_idx{};
    unsigned threads = 0;
    std::vector<Fiber> fibers;
    unsigned current = 0;
    void* scheduler_sp = nullptr;
    char* stacks = nullptr;
};

thread_local Block* active = nullptr;

// Every launch in the process runs alone: `__shared__` variables are statics.
std::mutex& launch_lock() {
    static auto* m = new std::mutex();
    return *m;
}

[[noreturn]] void fail(const Block& b, const char* what) {
    std::fprintf(stderr,
                 "cuda emulator: kernel %s, block (%u, %u, %u): %s\n", b.kernel,
                 b.block_idx.x, b.block_idx.y, b.block_idx.z, what);
    std::abort();
}

// Where every fiber starts (entered by `ret` from emu_switch).
extern "C" void emu_fiber_main() {
    Block& b = *active;
    b.launcher(b.fn, b.params);
    b.fibers[b.current].state = DONE;
    emu_switch(&b.fibers[b.current].sp, b.scheduler_sp);
    fail(b, "a finished thread was resumed");
}

void* fresh_stack(char* base) {
    // Six callee-saved registers, then emu_fiber_main as the return address, then a
    // word that stands for emu_fiber_main's own return address (it never returns), with
    // the stack 16-byte aligned at the call boundary as the ABI wants.
    auto* top = reinterpret_cast<uintptr_t*>(base + STACK);
    top -= 2;  // alignment slot and fake return address
    top[1] = 0;
    top[0] = reinterpret_cast<uintptr_t>(&emu_fiber_main);
    top -= 6;
    for (int i = 0; i < 6; i++) top[i] = 0;
    return top;
}

void yield(Block& b, State s) {
    b.fibers[b.current].state = s;
    emu_switch(&b.fibers[b.current].sp, b.scheduler_sp);
}

unsigned source_lane(int kind, int arg, unsigned lane) {
    switch (kind) {
        case SHFL_XOR: return (lane ^ (unsigned)arg) & 31u;
        case SHFL_DOWN: return lane + arg < 32 ? lane + arg : lane;
        case SHFL_UP: return lane >= (unsigned)arg ? lane - arg : lane;
        default: return (unsigned)arg & 31u;
    }
}

// Opens the barriers that every live thread (or warp lane) has reached; returns whether
// any opened.
bool open_barriers(Block& b) {
    bool opened = false;
    bool all_at_barrier = true, any_at_barrier = false;
    for (auto& f : b.fibers) {
        if (f.state == DONE) continue;
        if (f.state == AT_BARRIER) any_at_barrier = true;
        else all_at_barrier = false;
    }
    if (any_at_barrier && all_at_barrier) {
        for (auto& f : b.fibers)
            if (f.state == AT_BARRIER) f.state = RUNNABLE;
        opened = true;
    }
    for (unsigned w = 0; w * 32 < b.threads; w++) {
        unsigned first = w * 32, end = std::min(b.threads, first + 32);
        bool all = true, any = false;
        for (unsigned i = first; i < end; i++) {
            State s = b.fibers[i].state;
            if (s == DONE) continue;
            if (s == AT_SHUFFLE) any = true;
            else all = false;
        }
        if (!any || !all) continue;
        uint64_t offered[32] = {};
        bool live[32] = {};
        for (unsigned i = first; i < end; i++) {
            offered[i - first] = b.fibers[i].value;
            live[i - first] = b.fibers[i].state == AT_SHUFFLE;
        }
        for (unsigned i = first; i < end; i++) {
            Fiber& f = b.fibers[i];
            if (f.state != AT_SHUFFLE) continue;
            unsigned src = source_lane(f.kind, f.arg, i - first);
            if (src >= end - first || !live[src]) fail(b, "a shuffle read an inactive lane");
            f.value = offered[src];
            f.state = RUNNABLE;
        }
        opened = true;
    }
    return opened;
}

enum Order { FORWARD, REVERSE, SHUFFLE };

Order schedule_order() {
    static const Order order = [] {
        const char* v = std::getenv("KIMI_HYBRID_EMULATOR_SCHEDULE");
        if (!v || !std::strcmp(v, "forward")) return FORWARD;
        if (!std::strcmp(v, "reverse")) return REVERSE;
        if (!std::strcmp(v, "shuffle")) return SHUFFLE;
        std::fprintf(stderr, "cuda emulator: KIMI_HYBRID_EMULATOR_SCHEDULE=%s is not forward, "
                             "reverse or shuffle\n", v);
        std::abort();
    }();
    return order;
}

// This round's order of the block's threads.
void round_order(std::vector<unsigned>& order, unsigned threads, uint64_t& seed) {
    order.resize(threads);
    for (unsigned i = 0; i < threads; i++) order[i] = i;
    switch (schedule_order()) {
        case FORWARD: break;
        case REVERSE:
            for (unsigned i = 0; i < threads / 2; i++) std::swap(order[i], order[threads - 1 - i]);
            break;
        case SHUFFLE:
            for (unsigned i = threads; i > 1; i--) {
                seed = seed * 6364136223846793005ull + 1442695040888963407ull;
                std::swap(order[i - 1], order[(seed >> 33) % i]);
            }
            break;
    }
}

void run_block(Block& b) {
    for (unsigned i = 0; i < b.threads; i++) {
        Fiber& f = b.fibers[i];
        f.state = RUNNABLE;
        f.sp = fresh_stack(b.stacks + (size_t)i * STACK);
        f.idx = {i % b.block.x, (i / b.block.x) % b.block.y, i / (b.block.x * b.block.y)};
    }
    std::vector<unsigned> order;
    uint64_t seed = 0x9e3779b97f4a7c15ull ^ (b.block_idx.x * 0x100000001b3ull + b.block_idx.y);
    for (;;) {
        bool ran = false;
        round_order(order, b.threads, seed);
        for (unsigned i : order) {
            if (b.fibers[i].state != RUNNABLE) continue;
            b.current = i;
            emu_switch(&b.scheduler_sp, b.fibers[i].sp);
            ran = true;
        }
        if (open_barriers(b)) continue;
        bool done = true;
        for (auto& f : b.fibers) done = done && f.state == DONE;
        if (done) return;
        if (!ran) fail(b, "threads wait at barriers that can never open");
    }
}

char* stack_area() {
    static char* area = nullptr;
    if (!area) {
        void* p = mmap(nullptr, STACK * MAX_THREADS, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            std::fprintf(stderr, "cuda emulator: no memory for thread stacks\n");
            std::abort();
        }
        area = static_cast<char*>(p);
    }
    return area;
}

}  // namespace

const dim3& thread_idx() { return active->fibers[active->current].idx; }
const dim3& block_idx() { return active->block_idx; }
const dim3& block_dim() { return active->block; }
const dim3& grid_dim() { return active->grid; }

void sync_block() { yield(*active, AT_BARRIER); }

uint64_t shuffle(uint64_t bits, int kind, int arg) {
    Block& b = *active;
    Fiber& f = b.fibers[b.current];
    f.value = bits;
    f.kind = kind;
    f.arg = arg;
    yield(b, AT_SHUFFLE);
    return b.fibers[b.current].value;
}

// The kernel being run, for the fault handler's message.
const char* running_kernel() { return active ? active->kernel : nullptr; }

// Runs one launch to the end; the driver has checked its shape (at most MAX_THREADS
// threads per block).
// The launch's dynamic shared memory (`extern __shared__`), filled with 0xff bytes
// before every block as a GPU leaves it holding whatever was there, so a kernel that
// reads what it did not write sees NaN rather than zeros.
std::vector<unsigned char>& dynamic_area() {
    static std::vector<unsigned char> area;
    return area;
}

void* dynamic_shared() { return dynamic_area().data(); }

void run_launch(const char* kernel, void* fn, Launcher launcher, void** params, dim3 grid,
               dim3 block, unsigned shared_bytes) {
    unsigned threads = block.x * block.y * block.z;
    std::lock_guard<std::mutex> guard(launch_lock());
    dynamic_area().assign(shared_bytes + 16, 0xff);
    Block b;
    b.kernel = kernel;
    b.fn = fn;
    b.launcher = launcher;
    b.params = params;
    b.grid = grid;
    b.block = block;
    b.threads = threads;
    b.fibers.resize(threads);
    b.stacks = stack_area();
    Block* outer = active;
    active = &b;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                b.block_idx = {x, y, z};
                std::fill(dynamic_area().begin(), dynamic_area().end(), 0xff);
                run_block(b);
            }
    active = outer;
}

}  // namespace emu
