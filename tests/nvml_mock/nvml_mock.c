/*
 * A stand-in for NVIDIA's management library (libnvidia-ml.so.1), for the GPU end-to-end
 * suite on a machine without a GPU (tests/gpu.rs builds it with `cc -shared -fPIC`).
 *
 * It implements the NVML entry points aitherd's NVML backend calls through nvml-wrapper
 * (src/gpu/backend.rs): init and shutdown, the device count and handles, UUID, name, minor
 * number, memory, running compute processes, MIG mode and MIG device handles, and
 * nvmlErrorString. nvml-wrapper-sys resolves each symbol on its own (a missing one is an error
 * only when called), so nothing else is needed.
 *
 * Its state is re-read on every call from the file named by NVML_MOCK_STATE, so that a test
 * can change it between two polls of the daemon. One directive a line ('#' starts a comment):
 *
 *   init fail [CODE]                     nvmlInit* answers CODE (default 9, DRIVER_NOT_LOADED)
 *   device MINOR TOTAL_MB UUID NAME...   a GPU (index = order of the device lines)
 *   gone INDEX                           the device fell off the bus (GPU_IS_LOST)
 *   proc INDEX PID USED_MB|na            a compute process; "na" = NVML_VALUE_NOT_AVAILABLE
 *   mig INDEX 0|1                        the device's current MIG mode (default 0)
 *   migdev INDEX UUID GI CI TOTAL_MB SLICES   a MIG device of the device (in order), SLICES
 *                                        its GPU instance's slices (the "1g" of "1g.10gb")
 *
 * This file is test code: it is never built into or installed with aitherd.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
typedef void *nvmlDevice_t;

enum {
    OK = 0,
    ERR_UNINITIALIZED = 1,
    ERR_INVALID_ARGUMENT = 2,
    ERR_NOT_SUPPORTED = 3,
    ERR_NOT_FOUND = 6,
    ERR_INSUFFICIENT_SIZE = 7,
    ERR_DRIVER_NOT_LOADED = 9,
    ERR_GPU_IS_LOST = 15,
    ERR_UNKNOWN = 999,
};

#define MAX_DEV 16
#define MAX_MIG 8
#define MAX_PROC 256
#define NOT_AVAILABLE 0xFFFFFFFFFFFFFFFFULL

struct mig {
    char uuid[96];
    unsigned gi, ci, slices;
    unsigned long long total_mb;
};

struct dev {
    unsigned minor;
    unsigned long long total_mb;
    char uuid[96], name[96];
    int gone, mig_mode, nmig;
    struct mig mig[MAX_MIG];
};

struct proc {
    unsigned dev, pid;
    unsigned long long used; /* bytes, or NOT_AVAILABLE */
};

static struct {
    int init_fail;
    int ndev, nproc;
    struct dev dev[MAX_DEV];
    struct proc proc[MAX_PROC];
} S;

static int initialized;

/* Reads the state file; 0 on success, an NVML error otherwise (no file: UNKNOWN). */
static int load(void)
{
    memset(&S, 0, sizeof S);
    const char *path = getenv("NVML_MOCK_STATE");
    if (!path)
        return ERR_UNKNOWN;
    FILE *f = fopen(path, "re");
    if (!f)
        return ERR_UNKNOWN;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        char *hash = strchr(line, '#');
        if (hash)
            *hash = 0;
        line[strcspn(line, "\n")] = 0;
        unsigned a, b, c, sl;
        unsigned long long mb;
        char s1[96], s2[96];
        int n = 0;
        if (sscanf(line, "init fail %u", &a) == 1) {
            S.init_fail = (int)a;
        } else if (strncmp(line, "init fail", 9) == 0) {
            S.init_fail = ERR_DRIVER_NOT_LOADED;
        } else if (sscanf(line, "device %u %llu %95s %n", &a, &mb, s1, &n) == 3 && n > 0 &&
                   S.ndev < MAX_DEV) {
            struct dev *d = &S.dev[S.ndev++];
            d->minor = a;
            d->total_mb = mb;
            snprintf(d->uuid, sizeof d->uuid, "%s", s1);
            snprintf(d->name, sizeof d->name, "%s", line + n);
        } else if (sscanf(line, "gone %u", &a) == 1 && a < MAX_DEV) {
            S.dev[a].gone = 1;
        } else if (sscanf(line, "proc %u %u %95s", &a, &b, s1) == 3 && a < MAX_DEV &&
                   S.nproc < MAX_PROC) {
            struct proc *p = &S.proc[S.nproc++];
            p->dev = a;
            p->pid = b;
            p->used = strcmp(s1, "na") == 0 ? NOT_AVAILABLE : strtoull(s1, NULL, 10) << 20;
        } else if (sscanf(line, "mig %u %u", &a, &b) == 2 && a < MAX_DEV) {
            S.dev[a].mig_mode = (int)b;
        } else if (sscanf(line, "migdev %u %95s %u %u %llu %u", &a, s2, &b, &c, &mb, &sl) == 6 &&
                   a < MAX_DEV && S.dev[a].nmig < MAX_MIG) {
            struct mig *m = &S.dev[a].mig[S.dev[a].nmig++];
            snprintf(m->uuid, sizeof m->uuid, "%s", s2);
            m->gi = b;
            m->ci = c;
            m->total_mb = mb;
            m->slices = sl;
        }
    }
    fclose(f);
    return OK;
}

/* Handles: 0x1000 + device index; MIG devices 0x2000 + device * 16 + instance. */
static nvmlDevice_t dev_handle(unsigned i) { return (nvmlDevice_t)(uintptr_t)(0x1000 + i); }
static nvmlDevice_t mig_handle(unsigned i, unsigned m)
{
    return (nvmlDevice_t)(uintptr_t)(0x2000 + i * 16 + m);
}

/* The device (and MIG instance, or -1) a handle names, after re-reading the state. */
static int resolve(nvmlDevice_t h, struct dev **d, int *mig)
{
    if (!initialized)
        return ERR_UNINITIALIZED;
    int rc = load();
    if (rc)
        return rc;
    uintptr_t v = (uintptr_t)h;
    unsigned i;
    *mig = -1;
    if (v >= 0x1000 && v < 0x1000 + MAX_DEV) {
        i = (unsigned)(v - 0x1000);
    } else if (v >= 0x2000 && v < 0x2000 + MAX_DEV * 16) {
        i = (unsigned)((v - 0x2000) / 16);
        *mig = (int)((v - 0x2000) % 16);
    } else {
        return ERR_INVALID_ARGUMENT;
    }
    if ((int)i >= S.ndev)
        return ERR_INVALID_ARGUMENT;
    *d = &S.dev[i];
    if ((*d)->gone)
        return ERR_GPU_IS_LOST;
    if (*mig >= 0 && *mig >= (*d)->nmig)
        return ERR_INVALID_ARGUMENT;
    return OK;
}

static nvmlReturn_t init(void)
{
    int rc = load();
    if (rc)
        return rc;
    if (S.init_fail)
        return S.init_fail;
    initialized = 1;
    return OK;
}

nvmlReturn_t nvmlInit_v2(void) { return init(); }
nvmlReturn_t nvmlInit(void) { return init(); }
nvmlReturn_t nvmlInitWithFlags(unsigned flags)
{
    (void)flags;
    return init();
}

nvmlReturn_t nvmlShutdown(void)
{
    if (!initialized)
        return ERR_UNINITIALIZED;
    initialized = 0;
    return OK;
}

const char *nvmlErrorString(nvmlReturn_t r)
{
    switch (r) {
    case OK: return "Success";
    case ERR_UNINITIALIZED: return "Uninitialized";
    case ERR_INVALID_ARGUMENT: return "Invalid Argument";
    case ERR_NOT_SUPPORTED: return "Not Supported";
    case ERR_NOT_FOUND: return "Not Found";
    case ERR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case ERR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case ERR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned len)
{
    if (!initialized)
        return ERR_UNINITIALIZED;
    if (!version || len < 16)
        return ERR_INSUFFICIENT_SIZE;
    snprintf(version, len, "550.54.15");
    return OK;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *count)
{
    if (!initialized)
        return ERR_UNINITIALIZED;
    int rc = load();
    if (rc)
        return rc;
    if (!count)
        return ERR_INVALID_ARGUMENT;
    *count = (unsigned)S.ndev;
    return OK;
}
nvmlReturn_t nvmlDeviceGetCount(unsigned *count) { return nvmlDeviceGetCount_v2(count); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, nvmlDevice_t *device)
{
    if (!initialized)
        return ERR_UNINITIALIZED;
    int rc = load();
    if (rc)
        return rc;
    if (!device || (int)index >= S.ndev)
        return ERR_INVALID_ARGUMENT;
    if (S.dev[index].gone)
        return ERR_GPU_IS_LOST;
    *device = dev_handle(index);
    return OK;
}
nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

static nvmlReturn_t copy_str(const char *s, char *out, unsigned len)
{
    if (!out)
        return ERR_INVALID_ARGUMENT;
    if (strlen(s) + 1 > len)
        return ERR_INSUFFICIENT_SIZE;
    memcpy(out, s, strlen(s) + 1);
    return OK;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t h, char *uuid, unsigned len)
{
    struct dev *d;
    int m, rc = resolve(h, &d, &m);
    if (rc)
        return rc;
    return copy_str(m >= 0 ? d->mig[m].uuid : d->uuid, uuid, len);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t h, char *name, unsigned len)
{
    struct dev *d;
    int m, rc = resolve(h, &d, &m);
    if (rc)
        return rc;
    return copy_str(d->name, name, len);
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t h, unsigned *minor)
{
    struct dev *d;
    int m, rc = resolve(h, &d, &m);
    if (rc)
        return rc;
    if (!minor)
        return ERR_INVALID_ARGUMENT;
    if (m >= 0)
        return ERR_NOT_SUPPORTED;
    *minor = d->minor;
    return OK;
}

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

static unsigned long long used_on(struct dev *d)
{
    unsigned long long sum = 0;
    for (int i = 0; i < S.nproc; i++)
        if (&S.dev[S.proc[i].dev] == d && S.proc[i].used != NOT_AVAILABLE)
            sum += S.proc[i].used;
    return sum;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t h, nvmlMemory_t *mem)
{
    struct dev *d;
    int m, rc = resolve(h, &d, &m);
    if (rc)
        return rc;
    if (!mem)
        return ERR_INVALID_ARGUMENT;
    mem->total = (m >= 0 ? d->mig[m].total_mb : d->total_mb) << 20;
    mem->used = m >= 0 ? 0 : used_on(d);
    mem->free = mem->total > mem->used ? mem->total - mem->used : 0;
    return OK;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t h, nvmlMemory_v2_t *mem)
{
    if (!mem)
        return ERR_INVALID_ARGUMENT;
    nvmlMemory_t v1;
    nvmlReturn_t rc = nvmlDeviceGetMemoryInfo(h, &v1);
    if (rc)
        return rc;
    mem->total = v1.total;
    mem->reserved = 0;
    mem->free = v1.free;
    mem->used = v1.used;
    return OK;
}

/* nvmlProcessInfo_t of NVML 11.x/12.x (what the _v2 and _v3 calls fill). */
typedef struct {
    unsigned pid;
    unsigned long long usedGpuMemory;
    unsigned gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;

typedef struct {
    unsigned pid;
    unsigned long long usedGpuMemory;
} nvmlProcessInfo_v1_t;

static nvmlReturn_t processes(nvmlDevice_t h, unsigned *count, void *infos, int v1)
{
    struct dev *d;
    int m, rc = resolve(h, &d, &m);
    if (rc)
        return rc;
    if (!count)
        return ERR_INVALID_ARGUMENT;
    unsigned n = 0;
    for (int i = 0; i < S.nproc; i++)
        if (&S.dev[S.proc[i].dev] == d)
            n++;
    if (n == 0) {
        *count = 0;
        return OK;
    }
    if (!infos || *count < n) {
        *count = n;
        return ERR_INSUFFICIENT_SIZE;
    }
    unsigned k = 0;
    for (int i = 0; i < S.nproc; i++) {
        if (&S.dev[S.proc[i].dev] != d)
            continue;
        if (v1) {
            nvmlProcessInfo_v1_t *p = (nvmlProcessInfo_v1_t *)infos + k++;
            p->pid = S.proc[i].pid;
            p->usedGpuMemory = S.proc[i].used;
        } else {
            nvmlProcessInfo_t *p = (nvmlProcessInfo_t *)infos + k++;
            p->pid = S.proc[i].pid;
            p->usedGpuMemory = S.proc[i].used;
            p->gpuInstanceId = 0xFFFFFFFF;
            p->computeInstanceId = 0xFFFFFFFF;
        }
    }
    *count = n;
    return OK;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t h, unsigned *count,
                                                      nvmlProcessInfo_t *infos)
{
    return processes(h, count, infos, 0);
}
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t h, unsigned *count,
                                                      nvmlProcessInfo_t *infos)
{
    return processes(h, count, infos, 0);
}
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t h, unsigned *count,
                                                   nvmlProcessInfo_v1_t *infos)
{
    return processes(h, count, infos, 1);
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t h, unsigned *current, unsigned *pending)
{
    struct dev *d;
    int m, rc = resolve(h, &d, &m);
    if (rc)
        return rc;
    if (!current || !pending)
        return ERR_INVALID_ARGUMENT;
    if (m >= 0)
        return ERR_NOT_SUPPORTED;
    *current = *pending = (unsigned)d->mig_mode;
    return OK;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t h, unsigned *count)
{
    struct dev *d;
    int m, rc = resolve(h, &d, &m);
    if (rc)
        return rc;
    if (!count)
        return ERR_INVALID_ARGUMENT;
    *count = d->mig_mode ? MAX_MIG : 0;
    return OK;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t h, unsigned index,
                                                 nvmlDevice_t *mig)
{
    struct dev *d;
    int m, rc = resolve(h, &d, &m);
    if (rc)
        return rc;
    if (!mig || m >= 0)
        return ERR_INVALID_ARGUMENT;
    if (!d->mig_mode || (int)index >= d->nmig)
        return ERR_NOT_FOUND;
    *mig = mig_handle((unsigned)(d - S.dev), index);
    return OK;
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t h, unsigned *is_mig)
{
    struct dev *d;
    int m, rc = resolve(h, &d, &m);
    if (rc)
        return rc;
    if (!is_mig)
        return ERR_INVALID_ARGUMENT;
    *is_mig = m >= 0;
    return OK;
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t h, nvmlDevice_t *parent)
{
    struct dev *d;
    int m, rc = resolve(h, &d, &m);
    if (rc)
        return rc;
    if (!parent || m < 0)
        return ERR_INVALID_ARGUMENT;
    *parent = dev_handle((unsigned)(d - S.dev));
    return OK;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t h, unsigned *id)
{
    struct dev *d;
    int m, rc = resolve(h, &d, &m);
    if (rc)
        return rc;
    if (!id || m < 0)
        return ERR_INVALID_ARGUMENT;
    *id = d->mig[m].gi;
    return OK;
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t h, unsigned *id)
{
    struct dev *d;
    int m, rc = resolve(h, &d, &m);
    if (rc)
        return rc;
    if (!id || m < 0)
        return ERR_INVALID_ARGUMENT;
    *id = d->mig[m].ci;
    return OK;
}

/* nvmlDeviceAttributes_t (what nvmlDeviceGetAttributes_v2 fills). */
typedef struct {
    unsigned multiprocessorCount, sharedCopyEngineCount, sharedDecoderCount, sharedEncoderCount,
        sharedJpegCount, sharedOfaCount, gpuInstanceSliceCount, computeInstanceSliceCount;
    unsigned long long memorySizeMB;
} nvmlDeviceAttributes_t;

nvmlReturn_t nvmlDeviceGetAttributes_v2(nvmlDevice_t h, nvmlDeviceAttributes_t *attr)
{
    struct dev *d;
    int m, rc = resolve(h, &d, &m);
    if (rc)
        return rc;
    if (!attr)
        return ERR_INVALID_ARGUMENT;
    memset(attr, 0, sizeof *attr);
    if (m >= 0) {
        attr->gpuInstanceSliceCount = d->mig[m].slices;
        attr->computeInstanceSliceCount = d->mig[m].slices;
        attr->multiprocessorCount = 16 * d->mig[m].slices;
        attr->memorySizeMB = d->mig[m].total_mb;
    } else {
        attr->gpuInstanceSliceCount = 7;
        attr->computeInstanceSliceCount = 7;
        attr->multiprocessorCount = 132;
        attr->memorySizeMB = d->total_mb;
    }
    return OK;
}
