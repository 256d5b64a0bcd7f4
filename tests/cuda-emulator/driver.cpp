// A stand-in for libcuda.so that runs the project's kernels on the CPU, so the whole CUDA
// backend (its NVRTC compile, module loading, launches with their grids and argument
// lists, allocations, copies, events, staging, several GPUs) runs on machines without a
// GPU. The tests that need a GPU are run against it by `.ci/run`.
//
// - Devices: `KIMI_HYBRID_EMULATED_GPUS` of them (default 1), reporting compute
//   capability 9.0 and `KIMI_HYBRID_EMULATED_GPU_GIB` GiB (default 16) of memory, or
//   per device with a list (`16,16,0.002`: the third a 2 MiB device).
// - Memory: device and pinned allocations are host memory. Each device buffer ends at a
//   page with no access rights after it, so a kernel reading or writing past the end of
//   any buffer (by 16 bytes or more) stops the process with a message naming the kernel.
// - Work queued on a stream runs when the host waits for it (see "streams" below).
// - Streams belong to the device they were created on; an asynchronous copy on one
//   while another device's context is current fails, as on a GPU.
// - Stream capture and graph launches, with what a GPU refuses during a capture refused
//   here too (see "graphs" below).
// - Modules: the PTX NVRTC produced is accepted and its kernels are found by name among
//   the kernels compiled into this library from the same sources (kernels.cpp).
// - Anything else of the driver API answers CUDA_ERROR_NOT_SUPPORTED and says so on
//   stderr (stubs.cpp, generated from the symbols cudarc loads).

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>

#include "cuda_emu.h"

namespace emu {
void run_launch(const char* kernel, void* fn, Launcher launcher, void** params, dim3 grid,
               dim3 block, unsigned shared_bytes);
const char* running_kernel();
}  // namespace emu

namespace {

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
constexpr CUresult OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, INVALID_DEVICE = 101,
                   INVALID_CONTEXT = 201, ILLEGAL_STATE = 401, NOT_FOUND = 500, NOT_SUPPORTED = 801,
                   CAPTURE_UNSUPPORTED = 900, CAPTURE_INVALIDATED = 901,
                   CAPTURE_ISOLATION = 905, CAPTURED_EVENT = 907;

struct Kernel {
    std::string name;
    void* fn;
    emu::Launcher launcher;
    emu::Snapshotter snapshot;
    unsigned long long launches = 0;
    // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: a launch may ask for more dynamic
    // shared memory than 48 KiB only up to what the kernel was opted in to.
    int max_dynamic_shared = 48 * 1024;
};

// The driver's state is never destroyed: the process may still free buffers and launch
// from other threads while it exits, as it may with the real driver.
std::unordered_map<std::string, Kernel>& kernels() {
    static auto* k = new std::unordered_map<std::string, Kernel>();
    return *k;
}

struct Context {
    int device;
};

// A stream's queue: each context's default stream and every created stream.
using QueueKey = std::pair<int, void*>;

struct EventState {
    double seconds = 0.0;
    bool done = true;
    QueueKey queue{0, nullptr};
    // The capture its last record was made in (0: none).
    unsigned long long capture = 0;
};

// An event handle; its state outlives the handle while a record of it is still queued
// (destroying an event does not wait for its work, on a GPU or here).
struct Event {
    std::shared_ptr<EventState> state = std::make_shared<EventState>();
};

struct Allocation {
    void* map;
    size_t map_len;
    size_t size;
    int device;
};

std::mutex& memory_lock() {
    static auto* m = new std::mutex();
    return *m;
}
std::map<uintptr_t, Allocation>& allocations() {
    static auto* a = new std::map<uintptr_t, Allocation>();
    return *a;
}
size_t used[64];

int device_count() {
    const char* v = std::getenv("KIMI_HYBRID_EMULATED_GPUS");
    int n = v ? std::atoi(v) : 1;
    return n < 0 ? 0 : (n > 64 ? 64 : n);
}

// Device `d`'s memory: entry d of the comma-separated GiB list (the last entry for the
// devices beyond it).
size_t device_bytes(int d) {
    const char* v = std::getenv("KIMI_HYBRID_EMULATED_GPU_GIB");
    double gib = 16.0;
    for (int i = 0; v && *v; i++) {
        gib = std::atof(v);
        const char* comma = std::strchr(v, ',');
        if (i == d || !comma) break;
        v = comma + 1;
    }
    return (size_t)(gib * (double)(1ull << 30));
}

Context* contexts() {
    static Context c[64];
    for (int i = 0; i < 64; i++) c[i].device = i;
    return c;
}

thread_local Context* current = nullptr;

double now() {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
}

size_t page() {
    static size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

// `size` bytes whose end (rounded up to 16) touches a page with no access rights.
CUresult device_alloc(CUdeviceptr* out, size_t size) {
    if (!out) return INVALID_VALUE;
    int device = current ? current->device : 0;
    size_t body = (size + 15) & ~(size_t)15;
    size_t len = ((body + page() - 1) / page() + 1) * page();
    std::lock_guard<std::mutex> g(memory_lock());
    if (used[device] + size > device_bytes(device)) return OUT_OF_MEMORY;
    void* map = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) return OUT_OF_MEMORY;
    char* guard = static_cast<char*>(map) + len - page();
    mprotect(guard, page(), PROT_NONE);
    char* ptr = guard - body;
    // Fresh device memory holds whatever was there before; 0xff bytes (NaN as f32, -1 as
    // an int) make a read of memory nothing wrote show up in the results.
    std::memset(ptr, 0xff, body);
    allocations()[(uintptr_t)ptr] = {map, len, size, device};
    used[device] += size;
    *out = (CUdeviceptr)(uintptr_t)ptr;
    return OK;
}

CUresult device_free(CUdeviceptr p) {
    if (p == 0) return OK;
    std::lock_guard<std::mutex> g(memory_lock());
    auto it = allocations().find((uintptr_t)p);
    if (it == allocations().end()) return INVALID_VALUE;
    used[it->second.device] -= it->second.size;
    munmap(it->second.map, it->second.map_len);
    allocations().erase(it);
    return OK;
}

// ---- streams ---------------------------------------------------------------------------
// Work queued on a stream (launches, asynchronous copies and sets, stream-ordered frees,
// event records) does not run when it is queued: it runs, in order, when the host waits
// for it (stream, event or context synchronisation, a synchronous copy, a copy into
// pageable memory) or when another stream waits on one of its events. So host code that
// reads a page-locked buffer before waiting for the copy into it, or refills one before
// the copy out of it has run, sees what it would see on a GPU that is behind.
// KIMI_HYBRID_EMULATOR_SYNC=1 runs every piece of work when it is queued instead.

std::recursive_mutex& queue_lock() {
    static auto* m = new std::recursive_mutex();
    return *m;
}
std::map<QueueKey, std::deque<std::function<void()>>>& queues() {
    static auto* q = new std::map<QueueKey, std::deque<std::function<void()>>>();
    return *q;
}

// The device of every created stream: a stream belongs to the context it was created in.
std::map<void*, int>& stream_devices() {
    static auto* m = new std::map<void*, int>();
    return *m;
}

// A stream's queue: a created stream's own, or the legacy default stream of the current
// context.
QueueKey key_of(void* stream) {
    int device = current ? current->device : 0;
    if (!stream) return {device, stream};
    std::lock_guard<std::recursive_mutex> g(queue_lock());
    auto it = stream_devices().find(stream);
    return {it == stream_devices().end() ? device : it->second, stream};
}

// An asynchronous copy on a stream of a device whose context is not current fails on a
// GPU (the copy's memory is checked against the current context); refused here too.
CUresult check_context(void* stream, const char* call) {
    int device = current ? current->device : 0;
    if (key_of(stream).first == device) return OK;
    std::fprintf(stderr,
                 "cuda emulator: %s on a stream of device %d while device %d's context is "
                 "current\n",
                 call, key_of(stream).first, device);
    return INVALID_CONTEXT;
}

bool run_at_once() {
    static const bool sync = [] {
        const char* v = std::getenv("KIMI_HYBRID_EMULATOR_SYNC");
        return v && !std::strcmp(v, "1");
    }();
    return sync;
}

// ---- graphs --------------------------------------------------------------------------
// Stream capture (cuStreamBeginCapture) records the work queued on a stream into a graph
// instead of queueing it; nothing of it runs until the graph is launched, and then it
// runs with the arguments it was captured with, as on a GPU. What a GPU refuses during a
// capture is refused here and invalidates the capture (cuStreamEndCapture then answers
// CUDA_ERROR_STREAM_CAPTURE_INVALIDATED):
// - waiting for the capturing stream (synchronising it, querying it);
// - in the global and thread-local modes, from the capturing thread: synchronous
//   allocations, frees, copies and sets, context synchronisation, page-locked
//   allocations (the calls CUDA calls potentially unsafe);
// - copies between the capturing stream and pageable host memory;
// - waiting on an event recorded outside the capture (CUDA_ERROR_STREAM_CAPTURE_ISOLATION);
// - a stream-ordered free, in the capture, of memory the capture did not allocate
//   (a free node must be given a graph allocation).
// Stream-ordered allocations made during a capture belong to the graph: their addresses
// are fixed for every launch, and the memory is returned when the graph is destroyed.
// A graph that keeps an allocation it made (no free in the graph) cannot be launched
// again, as on a GPU.
CUresult device_free(CUdeviceptr p);

struct GraphData {
    std::vector<std::function<void()>> ops;
    std::vector<CUdeviceptr> owned;
    std::map<CUdeviceptr, bool> live;  // graph allocations not freed in the graph
    unsigned long long launches = 0;
    ~GraphData() {
        for (CUdeviceptr p : owned) device_free(p);
    }
};

// A graph or an executable graph: both share what was captured.
struct GraphHandle {
    std::shared_ptr<GraphData> data;
    bool auto_free = false;  // CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH
};

struct Capture {
    unsigned long long id;
    std::shared_ptr<GraphData> graph;
    int mode;  // 0 global, 1 thread-local, 2 relaxed
    const void* thread;
    bool invalid = false;
    const char* why = nullptr;
};

std::map<QueueKey, Capture>& captures() {
    static auto* c = new std::map<QueueKey, Capture>();
    return *c;
}
thread_local char this_thread_tag;
unsigned long long graph_launches = 0;

Capture* capture_of(void* stream) {
    auto it = captures().find(key_of(stream));
    return it == captures().end() ? nullptr : &it->second;
}

CUresult invalidate(Capture* c, const char* why, CUresult e) {
    if (!c->invalid) {
        c->invalid = true;
        c->why = why;
        std::fprintf(stderr, "cuda emulator: stream capture invalidated: %s\n", why);
    }
    return e;
}

// A potentially unsafe call from this thread while it captures in global or
// thread-local mode: refused, and the capture invalidated.
CUresult unsafe_during_capture(const char* call) {
    std::lock_guard<std::recursive_mutex> g(queue_lock());
    for (auto& [key, c] : captures())
        if (c.mode != 2 && c.thread == &this_thread_tag)
            return invalidate(&c, call, CAPTURE_UNSUPPORTED);
    return OK;
}

// A call that waits for `stream`: refused while it captures.
CUresult wait_during_capture(void* stream, const char* call) {
    std::lock_guard<std::recursive_mutex> g(queue_lock());
    if (Capture* c = capture_of(stream)) return invalidate(c, call, CAPTURE_UNSUPPORTED);
    return OK;
}

void enqueue(void* stream, std::function<void()> op) {
    {
        std::lock_guard<std::recursive_mutex> g(queue_lock());
        if (Capture* c = capture_of(stream)) {
            if (!c->invalid) c->graph->ops.push_back(std::move(op));
            return;
        }
    }
    if (run_at_once()) {
        op();
        return;
    }
    std::lock_guard<std::recursive_mutex> g(queue_lock());
    queues()[key_of(stream)].push_back(std::move(op));
}

// Runs everything queued on one stream.
void flush(QueueKey key) {
    std::lock_guard<std::recursive_mutex> g(queue_lock());
    auto& q = queues()[key];
    while (!q.empty()) {
        auto op = std::move(q.front());
        q.pop_front();
        op();
    }
}

// Runs everything queued on every stream of `device` (every device for -1).
void flush_device(int device) {
    std::lock_guard<std::recursive_mutex> g(queue_lock());
    for (bool again = true; again;) {
        again = false;
        for (auto& [key, q] : queues())
            if ((device < 0 || key.first == device) && !q.empty()) {
                flush(key);
                again = true;
            }
    }
}

// Page-locked host allocations: copies to and from them stay queued.
std::map<uintptr_t, size_t>& pinned() {
    static auto* p = new std::map<uintptr_t, size_t>();
    return *p;
}
bool is_pinned(const void* ptr, size_t n) {
    std::lock_guard<std::mutex> g(memory_lock());
    auto it = pinned().upper_bound((uintptr_t)ptr);
    if (it == pinned().begin()) return false;
    --it;
    return (uintptr_t)ptr + n <= it->first + it->second;
}

void on_fault(int sig) {
    const char* k = emu::running_kernel();
    char msg[512];
    int n = std::snprintf(msg, sizeof msg,
                          "cuda emulator: %s%s%s touched memory outside every buffer (signal %d)\n",
                          k ? "kernel " : "host code", k ? k : "", k ? "" : " of the driver",
                          sig);
    if (n > 0) (void)!write(2, msg, (size_t)n);
    signal(sig, SIG_DFL);
    raise(sig);
}

struct InstallFaultHandler {
    InstallFaultHandler() { signal(SIGSEGV, on_fault); }
};

}  // namespace

namespace {
// With KIMI_HYBRID_EMULATOR_STATS=1, the launches of every kernel when the process exits
// (how many launches a pass issues is what CUDA graphs and fused kernels would save).
struct LaunchReport {
    ~LaunchReport() {
        const char* v = std::getenv("KIMI_HYBRID_EMULATOR_STATS");
        if (!v || std::strcmp(v, "1")) return;
        unsigned long long total = 0;
        for (auto& [name, k] : kernels()) {
            if (!k.launches) continue;
            std::fprintf(stderr, "cuda emulator: %8llu launches of %s\n", k.launches, name.c_str());
            total += k.launches;
        }
        std::fprintf(stderr, "cuda emulator: %8llu launches in all\n", total);
        std::fprintf(stderr, "cuda emulator: %8llu graph launches\n", graph_launches);
    }
} launch_report;
}  // namespace

void emu::register_kernel(const char* name, void* kernel, Launcher launcher,
                          Snapshotter snapshot) {
    kernels()[name] = {name, kernel, launcher, snapshot};
}

extern "C" {

__attribute__((visibility("default"))) int emu_unsupported(const char* name) {
    std::fprintf(stderr, "cuda emulator: %s is not emulated\n", name);
    return NOT_SUPPORTED;
}

#define API extern "C" __attribute__((visibility("default"))) CUresult

API cuInit(unsigned) {
    static InstallFaultHandler h;
    return OK;
}
API cuDriverGetVersion(int* v) {
    *v = 12080;
    return OK;
}
API cuDeviceGetCount(int* n) {
    *n = device_count();
    return OK;
}
API cuDeviceGet(int* d, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count()) return INVALID_DEVICE;
    *d = ordinal;
    return OK;
}
API cuDeviceGetName(char* name, int len, int dev) {
    std::snprintf(name, (size_t)len, "CUDA emulator %d (CPU)", dev);
    return OK;
}
API cuDeviceTotalMem_v2(size_t* bytes, int dev) {
    *bytes = device_bytes(dev);
    return OK;
}
API cuDeviceGetUuid(char* uuid, int dev) {
    std::memset(uuid, 0, 16);
    uuid[0] = (char)dev;
    return OK;
}
API cuDeviceGetUuid_v2(char* uuid, int dev) { return cuDeviceGetUuid(uuid, dev); }
API cuDeviceGetAttribute(int* v, int attrib, int) {
    switch (attrib) {
        case 1: *v = 1024; break;              // max threads per block
        case 2: case 3: *v = 1024; break;      // max block dims x, y
        case 4: *v = 64; break;                // max block dim z
        case 5: *v = 2147483647; break;        // max grid dim x
        case 6: case 7: *v = 65535; break;     // max grid dims y, z
        case 8: *v = 48 * 1024; break;         // shared memory per block
        case 10: *v = 32; break;               // warp size
        case 16: *v = 132; break;              // multiprocessors
        case 75: *v = 9; break;                // compute capability major
        case 76: *v = 0; break;                // compute capability minor
        case 97: *v = 227 * 1024; break;       // shared memory per block, opt-in
        case 115: *v = 1; break;               // memory pools supported
        default: *v = 0; break;
    }
    return OK;
}
API cuDeviceCanAccessPeer(int* can, int, int) {
    *can = 0;
    return OK;
}
API cuDevicePrimaryCtxRetain(void** ctx, int dev) {
    if (dev < 0 || dev >= device_count()) return INVALID_DEVICE;
    *ctx = &contexts()[dev];
    return OK;
}
API cuDevicePrimaryCtxRelease_v2(int) { return OK; }
API cuDevicePrimaryCtxSetFlags_v2(int, unsigned) { return OK; }
API cuDevicePrimaryCtxGetState(int, unsigned* flags, int* active) {
    *flags = 0;
    *active = 1;
    return OK;
}
API cuCtxSetCurrent(void* ctx) {
    current = static_cast<Context*>(ctx);
    return OK;
}
API cuCtxGetCurrent(void** ctx) {
    *ctx = current;
    return OK;
}
API cuCtxPushCurrent_v2(void* ctx) { return cuCtxSetCurrent(ctx); }
API cuCtxPopCurrent_v2(void** ctx) {
    if (ctx) *ctx = current;
    return OK;
}
API cuCtxGetDevice(int* d) {
    *d = current ? current->device : 0;
    return OK;
}
API cuCtxSynchronize() {
    if (CUresult e = unsafe_during_capture("cuCtxSynchronize")) return e;
    flush_device(current ? current->device : 0);
    return OK;
}

API cuStreamCreate(void** s, unsigned) {
    *s = new int(0);
    std::lock_guard<std::recursive_mutex> g(queue_lock());
    stream_devices()[*s] = current ? current->device : 0;
    return OK;
}
API cuStreamCreateWithPriority(void** s, unsigned, int) { return cuStreamCreate(s, 0); }
API cuStreamDestroy_v2(void* s) {
    flush(key_of(s));
    delete static_cast<int*>(s);
    return OK;
}
API cuStreamSynchronize(void* s) {
    if (CUresult e = wait_during_capture(s, "cuStreamSynchronize on the capturing stream")) return e;
    flush(key_of(s));
    return OK;
}
API cuStreamQuery(void* s) {
    if (CUresult e = wait_during_capture(s, "cuStreamQuery on the capturing stream")) return e;
    flush(key_of(s));
    return OK;
}
API cuStreamWaitEvent(void* s, void* e, unsigned) {
    {
        std::lock_guard<std::recursive_mutex> g(queue_lock());
        if (Capture* c = capture_of(s)) {
            if (static_cast<Event*>(e)->state->capture != c->id)
                return invalidate(c, "cuStreamWaitEvent on an event recorded outside the capture",
                                  CAPTURE_ISOLATION);
            return OK;  // recorded earlier on this stream in this capture: already ordered
        }
    }
    QueueKey other = static_cast<Event*>(e)->state->queue;
    if (other != key_of(s)) enqueue(s, [other] { flush(other); });
    return OK;
}

// Whether `e` was last recorded in a capture still in progress.
static bool captured_event(void* e) {
    std::lock_guard<std::recursive_mutex> g(queue_lock());
    unsigned long long id = static_cast<Event*>(e)->state->capture;
    for (auto& [key, c] : captures())
        if (id && c.id == id) return true;
    return false;
}

API cuEventCreate(void** e, unsigned) {
    *e = new Event();
    return OK;
}
API cuEventRecord(void* e, void* s) {
    auto st = static_cast<Event*>(e)->state;
    {
        std::lock_guard<std::recursive_mutex> g(queue_lock());
        Capture* c = capture_of(s);
        st->capture = c ? c->id : 0;
    }
    st->done = false;
    st->queue = key_of(s);
    enqueue(s, [st] {
        st->seconds = now();
        st->done = true;
    });
    return OK;
}
API cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
API cuEventSynchronize(void* e) {
    if (captured_event(e)) return CAPTURED_EVENT;
    flush(static_cast<Event*>(e)->state->queue);
    return OK;
}
API cuEventQuery(void* e) {
    if (captured_event(e)) return CAPTURED_EVENT;
    flush(static_cast<Event*>(e)->state->queue);
    return OK;
}
API cuEventDestroy_v2(void* e) {
    delete static_cast<Event*>(e);
    return OK;
}
API cuEventElapsedTime(float* ms, void* a, void* b) {
    flush(static_cast<Event*>(a)->state->queue);
    flush(static_cast<Event*>(b)->state->queue);
    *ms = (float)((static_cast<Event*>(b)->state->seconds - static_cast<Event*>(a)->state->seconds) * 1e3);
    return OK;
}
API cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

API cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    if (CUresult e = unsafe_during_capture("cuMemAlloc")) return e;
    return device_alloc(p, n);
}
API cuMemAllocAsync(CUdeviceptr* p, size_t n, void* s) {
    CUresult e = device_alloc(p, n);
    std::lock_guard<std::recursive_mutex> g(queue_lock());
    if (Capture* c = capture_of(s); c && e == OK) {
        c->graph->owned.push_back(*p);
        c->graph->live[*p] = true;
    }
    return e;
}
API cuMemFree_v2(CUdeviceptr p) {
    if (CUresult e = unsafe_during_capture("cuMemFree")) return e;
    flush_device(-1);
    return device_free(p);
}
API cuMemFreeAsync(CUdeviceptr p, void* s) {
    {
        std::lock_guard<std::recursive_mutex> g(queue_lock());
        if (Capture* c = capture_of(s)) {
            if (!c->graph->live.erase(p))
                return invalidate(c, "cuMemFreeAsync of memory the capture did not allocate",
                                  INVALID_VALUE);
            return OK;  // a free node: the graph's memory is returned with the graph
        }
    }
    enqueue(s, [p] { device_free(p); });
    return OK;
}
API cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    int device = current ? current->device : 0;
    std::lock_guard<std::mutex> g(memory_lock());
    *total = device_bytes(device);
    *free_bytes = *total - used[device];
    return OK;
}
API cuMemAllocHost_v2(void** p, size_t n) {
    if (CUresult e = unsafe_during_capture("cuMemAllocHost")) return e;
    *p = std::malloc(n ? n : 1);
    if (!*p) return OUT_OF_MEMORY;
    std::lock_guard<std::mutex> g(memory_lock());
    pinned()[(uintptr_t)*p] = n;
    return OK;
}
API cuMemHostAlloc(void** p, size_t n, unsigned) { return cuMemAllocHost_v2(p, n); }
API cuMemFreeHost(void* p) {
    if (CUresult e = unsafe_during_capture("cuMemFreeHost")) return e;
    flush_device(-1);
    {
        std::lock_guard<std::mutex> g(memory_lock());
        pinned().erase((uintptr_t)p);
    }
    std::free(p);
    return OK;
}
API cuMemHostRegister_v2(void* p, size_t n, unsigned) {
    if (CUresult e = unsafe_during_capture("cuMemHostRegister")) return e;
    std::lock_guard<std::mutex> g(memory_lock());
    pinned()[(uintptr_t)p] = n;
    return OK;
}
API cuMemHostUnregister(void* p) {
    if (CUresult e = unsafe_during_capture("cuMemHostUnregister")) return e;
    flush_device(-1);
    std::lock_guard<std::mutex> g(memory_lock());
    pinned().erase((uintptr_t)p);
    return OK;
}
API cuMemHostGetDevicePointer_v2(CUdeviceptr* d, void* h, unsigned) {
    *d = (CUdeviceptr)(uintptr_t)h;
    return OK;
}

static CUresult copy(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (n) std::memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n);
    return OK;
}
// A synchronous copy or set waits for the work queued before it.
static CUresult copy_now(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (CUresult e = unsafe_during_capture("a synchronous copy")) return e;
    flush_device(current ? current->device : 0);
    return copy(dst, src, n);
}
static CUresult copy_queued(void* stream, CUdeviceptr dst, CUdeviceptr src, size_t n) {
    enqueue(stream, [dst, src, n] { copy(dst, src, n); });
    return OK;
}
API cuMemcpy(CUdeviceptr d, CUdeviceptr s, size_t n) { return copy_now(d, s, n); }
API cuMemcpyAsync(CUdeviceptr d, CUdeviceptr s, size_t n, void* st) {
    if (CUresult e = check_context(st, "cuMemcpyAsync")) return e;
    return copy_queued(st, d, s, n);
}
API cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) {
    return copy_now(d, (CUdeviceptr)(uintptr_t)s, n);
}
API cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, void* st) {
    if (CUresult e = check_context(st, "cuMemcpyHtoDAsync")) return e;
    if (is_pinned(s, n)) return copy_queued(st, d, (CUdeviceptr)(uintptr_t)s, n);
    if (CUresult e = wait_during_capture(st, "a copy from pageable host memory")) return e;
    // From pageable memory the source is read when the copy is queued.
    auto bytes = std::make_shared<std::vector<char>>((const char*)s, (const char*)s + n);
    enqueue(st, [d, bytes] { copy(d, (CUdeviceptr)(uintptr_t)bytes->data(), bytes->size()); });
    return OK;
}
API cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) {
    return copy_now((CUdeviceptr)(uintptr_t)d, s, n);
}
API cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, void* st) {
    if (CUresult e = check_context(st, "cuMemcpyDtoHAsync")) return e;
    if (is_pinned(d, n)) return copy_queued(st, (CUdeviceptr)(uintptr_t)d, s, n);
    if (CUresult e = wait_during_capture(st, "a copy into pageable host memory")) return e;
    // Into pageable memory the copy is done when the call returns.
    flush(key_of(st));
    return copy((CUdeviceptr)(uintptr_t)d, s, n);
}
API cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) { return copy_now(d, s, n); }
API cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void* st) {
    if (CUresult e = check_context(st, "cuMemcpyDtoDAsync")) return e;
    return copy_queued(st, d, s, n);
}
API cuMemcpyPeer(CUdeviceptr d, void*, CUdeviceptr s, void*, size_t n) {
    if (CUresult e = unsafe_during_capture("cuMemcpyPeer")) return e;
    flush_device(-1);
    return copy(d, s, n);
}
API cuMemcpyPeerAsync(CUdeviceptr d, void*, CUdeviceptr s, void*, size_t n, void* st) {
    if (CUresult e = wait_during_capture(st, "a peer copy")) return e;
    flush_device(-1);
    return copy(d, s, n);
}
static void set8(CUdeviceptr d, unsigned char v, size_t n) {
    if (n) std::memset((void*)(uintptr_t)d, v, n);
}
static void set32(CUdeviceptr d, unsigned v, size_t n) {
    auto* p = (unsigned*)(uintptr_t)d;
    for (size_t i = 0; i < n; i++) p[i] = v;
}
API cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    if (CUresult e = unsafe_during_capture("a synchronous memset")) return e;
    flush_device(current ? current->device : 0);
    set8(d, v, n);
    return OK;
}
API cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void* st) {
    enqueue(st, [d, v, n] { set8(d, v, n); });
    return OK;
}
API cuMemsetD32_v2(CUdeviceptr d, unsigned v, size_t n) {
    if (CUresult e = unsafe_during_capture("a synchronous memset")) return e;
    flush_device(current ? current->device : 0);
    set32(d, v, n);
    return OK;
}
API cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, void* st) {
    enqueue(st, [d, v, n] { set32(d, v, n); });
    return OK;
}

API cuModuleLoadData(void** m, const void*) {
    *m = new int(0);
    return OK;
}
API cuModuleLoadDataEx(void** m, const void* image, unsigned, void*, void*) {
    return cuModuleLoadData(m, image);
}
API cuModuleUnload(void* m) {
    delete static_cast<int*>(m);
    return OK;
}
API cuModuleGetFunction(void** f, void*, const char* name) {
    auto it = kernels().find(name);
    if (it == kernels().end()) {
        std::fprintf(stderr, "cuda emulator: no kernel named %s was compiled in\n", name);
        return NOT_FOUND;
    }
    *f = &it->second;
    return OK;
}
API cuFuncGetAttribute(int* v, int attrib, void*) {
    *v = attrib == 0 ? 1024 : 0;  // max threads per block; sizes of nothing else
    return OK;
}
API cuFuncSetAttribute(void* f, int attrib, int value) {
    auto* k = static_cast<Kernel*>(f);
    if (!k) return INVALID_VALUE;
    if (attrib == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > 227 * 1024) return INVALID_VALUE;
        k->max_dynamic_shared = value;
    }
    return OK;
}
API cuFuncSetCacheConfig(void*, int) { return OK; }
API cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                   unsigned bz, unsigned shared, void* stream, void** params, void** extra) {
    auto* k = static_cast<Kernel*>(f);
    if (!k || extra) return INVALID_VALUE;
    if (shared > 48 * 1024 && (int)shared > k->max_dynamic_shared) return INVALID_VALUE;
    if (gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535) return INVALID_VALUE;
    unsigned threads = bx * by * bz;
    if (threads == 0 || threads > 1024) return INVALID_VALUE;
    __atomic_add_fetch(&k->launches, 1, __ATOMIC_RELAXED);
    auto ptrs = std::make_shared<std::vector<void*>>();
    std::shared_ptr<void> args = k->snapshot(params, *ptrs);
    emu::dim3 grid{gx, gy, gz}, block{bx, by, bz};
    enqueue(stream, [k, args, ptrs, grid, block, shared] {
        emu::run_launch(k->name.c_str(), k->fn, k->launcher, ptrs->data(), grid, block, shared);
    });
    return OK;
}

API cuStreamBeginCapture_v2(void* s, int mode) {
    if (!s) return CAPTURE_UNSUPPORTED;  // the legacy default stream cannot be captured
    std::lock_guard<std::recursive_mutex> g(queue_lock());
    if (capture_of(s)) return ILLEGAL_STATE;
    static unsigned long long next_id = 0;
    Capture c{++next_id, std::make_shared<GraphData>(), mode, &this_thread_tag};
    captures().emplace(key_of(s), std::move(c));
    return OK;
}
API cuStreamIsCapturing(void* s, int* status) {
    std::lock_guard<std::recursive_mutex> g(queue_lock());
    Capture* c = capture_of(s);
    *status = !c ? 0 : (c->invalid ? 2 : 1);
    return OK;
}
API cuStreamEndCapture(void* s, void** graph) {
    std::shared_ptr<GraphData> data;
    bool invalid;
    {
        std::lock_guard<std::recursive_mutex> g(queue_lock());
        Capture* c = capture_of(s);
        if (!c) return ILLEGAL_STATE;
        data = c->graph;
        invalid = c->invalid;
        captures().erase(key_of(s));
    }
    *graph = nullptr;
    if (invalid) return CAPTURE_INVALIDATED;  // `data` goes, with the memory it allocated
    *graph = new GraphHandle{data};
    return OK;
}
API cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long flags) {
    if (!graph) return INVALID_VALUE;
    *exec = new GraphHandle{static_cast<GraphHandle*>(graph)->data, (flags & 1) != 0};
    return OK;
}
API cuGraphLaunch(void* exec, void* s) {
    if (!exec) return INVALID_VALUE;
    auto* handle = static_cast<GraphHandle*>(exec);
    auto data = handle->data;
    if (data->launches > 0 && !data->live.empty() && !handle->auto_free) {
        std::fprintf(stderr, "cuda emulator: a graph that keeps an allocation it made was launched again\n");
        return INVALID_VALUE;
    }
    data->launches++;
    __atomic_add_fetch(&graph_launches, 1, __ATOMIC_RELAXED);
    enqueue(s, [data] {
        for (auto& op : data->ops) op();
    });
    return OK;
}
API cuGraphExecDestroy(void* exec) {
    delete static_cast<GraphHandle*>(exec);
    return OK;
}
API cuGraphDestroy(void* graph) {
    delete static_cast<GraphHandle*>(graph);
    return OK;
}

// Asked for by NVRTC and cuBLAS-style clients probing for private driver tables; there
// are none here, and saying so is their normal path.
API cuGetExportTable(const void** table, const void*) {
    if (table) *table = nullptr;
    return NOT_SUPPORTED;
}

API cuGetErrorString(CUresult e, const char** s) {
    switch (e) {
        case OK: *s = "no error"; break;
        case INVALID_VALUE: *s = "invalid argument"; break;
        case OUT_OF_MEMORY: *s = "out of memory (emulated device budget)"; break;
        case INVALID_DEVICE: *s = "invalid device ordinal"; break;
        case INVALID_CONTEXT: *s = "invalid device context"; break;
        case NOT_FOUND: *s = "named symbol not found"; break;
        case NOT_SUPPORTED: *s = "operation not supported by the CUDA emulator"; break;
        case ILLEGAL_STATE: *s = "operation not valid in this state"; break;
        case CAPTURE_UNSUPPORTED: *s = "operation not permitted when stream is capturing"; break;
        case CAPTURE_INVALIDATED: *s = "operation failed due to a previous error during capture"; break;
        case CAPTURE_ISOLATION: *s = "dependency created on uncaptured work in another stream"; break;
        case CAPTURED_EVENT: *s = "operation not permitted on an event last recorded in a capturing stream"; break;
        default: *s = "unknown error"; break;
    }
    return OK;
}
API cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case OK: *s = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; break;
        case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        case ILLEGAL_STATE: *s = "CUDA_ERROR_ILLEGAL_STATE"; break;
        case CAPTURE_UNSUPPORTED: *s = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
        case CAPTURE_INVALIDATED: *s = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
        case CAPTURE_ISOLATION: *s = "CUDA_ERROR_STREAM_CAPTURE_ISOLATION"; break;
        case CAPTURED_EVENT: *s = "CUDA_ERROR_CAPTURED_EVENT"; break;
        default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return OK;
}

}  // extern "C"
