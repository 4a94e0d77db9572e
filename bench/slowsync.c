/* slowsync.so: an LD_PRELOAD shim that makes fsync-family calls as slow as a device
 * whose cache flush takes F milliseconds (bench/README.md, "Slow disks").
 *
 * The model, shared by every process that maps SLOWSYNC_STATE (one file per server
 * under test, so one "device" per server; bench/slowdisk.py writes it):
 *   - the device runs one flush at a time, each taking F, the flush_ns field of the
 *     state (the bench changes it between phases; 0 is the real disk, no delay);
 *   - a sync call waits for the first flush that starts at or after the call: if the
 *     device is idle a flush starts now; if a flush is running, the next one starts
 *     when it ends, and every call made meanwhile shares that next flush (as a
 *     journaling file system batches concurrent fsyncs into one commit);
 *   - a caller never waits for a flush that started before its call.
 * The real call is made first (the data still reaches the disk); then the caller sleeps
 * until its modelled flush ends. fsync, fdatasync and syncfs are delayed always,
 * sync_file_range only when it waits for the write-out (SYNC_FILE_RANGE_WAIT_AFTER).
 *
 * With SLOWSYNC_LOG set, each call appends one line to that file:
 *   pid call target t_call_ns t_end_ns new|joined|next
 * (target is the file the descriptor names), for the flush accounting.
 *
 * Build: gcc -O2 -shared -fPIC -o slowsync.so slowsync.c -ldl (bench/slowdisk.py does).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

struct device {
    uint64_t flush_ns;      /* how long a flush takes; 0: no delay */
    uint64_t last_end_ns;   /* end of the latest flush started or scheduled */
    uint64_t flushes;       /* flushes started or scheduled */
    uint64_t calls;         /* sync calls made (delayed or not) */
};

static struct device *device;
static int log_fd = -1;
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_syncfs)(int);
static int (*real_sync_file_range)(int, off64_t, off64_t, unsigned int);

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

__attribute__((constructor)) static void slowsync_init(void)
{
    real_fsync = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    real_syncfs = (int (*)(int))dlsym(RTLD_NEXT, "syncfs");
    real_sync_file_range = (int (*)(int, off64_t, off64_t, unsigned int))
        dlsym(RTLD_NEXT, "sync_file_range");
    const char *path = getenv("SLOWSYNC_STATE");
    if (path == NULL || *path == '\0')
        return;
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return;
    void *map = mmap(NULL, sizeof(struct device), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return;
    device = map;
    const char *log = getenv("SLOWSYNC_LOG");
    if (log != NULL && *log)
        log_fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0666);
}

/* Reserve the flush this call waits for; returns when it ends and how it was got. */
static uint64_t reserve(uint64_t t, uint64_t flush_ns, const char **how)
{
    uint64_t last = __atomic_load_n(&device->last_end_ns, __ATOMIC_ACQUIRE);
    for (;;) {
        uint64_t end;
        if (t >= last) {
            end = t + flush_ns;            /* idle: a flush starts now */
            *how = "new";
        } else if (last - flush_ns > t) {
            *how = "joined";               /* the latest flush has not started: share it */
            return last;
        } else {
            end = last + flush_ns;         /* one is running: the next starts at its end */
            *how = "next";
        }
        if (__atomic_compare_exchange_n(&device->last_end_ns, &last, end, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            __atomic_add_fetch(&device->flushes, 1, __ATOMIC_RELAXED);
            return end;
        }
    }
}

static void note(const char *call, int fd, uint64_t t, uint64_t end, const char *how)
{
    char link[64], target[512], line[768];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    target[n > 0 ? n : 0] = '\0';
    int len = snprintf(line, sizeof line, "%d %s %s %llu %llu %s\n", (int)getpid(), call,
                       target, (unsigned long long)t, (unsigned long long)end, how);
    if (len > 0)
        (void)!write(log_fd, line, (size_t)len < sizeof line ? (size_t)len : sizeof line - 1);
}

static void wait_for_flush(const char *call, int fd, uint64_t t)
{
    if (device == NULL)
        return;
    __atomic_add_fetch(&device->calls, 1, __ATOMIC_RELAXED);
    uint64_t flush_ns = __atomic_load_n(&device->flush_ns, __ATOMIC_RELAXED);
    if (flush_ns == 0)
        return;
    int saved = errno;
    const char *how = "";
    uint64_t end = reserve(t, flush_ns, &how);
    if (log_fd >= 0)
        note(call, fd, t, end, how);
    struct timespec ts = {(time_t)(end / 1000000000u), (long)(end % 1000000000u)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
    errno = saved;
}

int fsync(int fd)
{
    uint64_t t = now_ns();
    int rc = real_fsync(fd);
    wait_for_flush("fsync", fd, t);
    return rc;
}

int fdatasync(int fd)
{
    uint64_t t = now_ns();
    int rc = real_fdatasync(fd);
    wait_for_flush("fdatasync", fd, t);
    return rc;
}

int syncfs(int fd)
{
    uint64_t t = now_ns();
    int rc = real_syncfs(fd);
    wait_for_flush("syncfs", fd, t);
    return rc;
}

int sync_file_range(int fd, off64_t offset, off64_t nbytes, unsigned int flags)
{
    uint64_t t = now_ns();
    int rc = real_sync_file_range(fd, offset, nbytes, flags);
    if (flags & SYNC_FILE_RANGE_WAIT_AFTER)
        wait_for_flush("sync_file_range", fd, t);
    return rc;
}
