/* A tiny QMP client that times query-migrate round trips (bench/bench_query_latency.py builds it).
 *
 * Why C: a Python client spends ~0.2 ms of its own CPU per answer (asyncio, JSON) and waits for a
 * CPU like everyone else on a busy host, so it adds its own delays to what it measures. This one
 * writes a request, blocks in read() until the answer's line is complete and records the time in
 * between; nothing else.
 *
 *   qmp_probe SOCKET IDLE_S MAX_S INTERVAL_US
 *
 * Connects, negotiates capabilities, then polls for IDLE_S seconds (the reference: the daemon before
 * the migration) and prints "ready" on stdout; waits for a line on stdin, then polls until an answer
 * carries a terminal status (completed, failed, cancelled) or MAX_S seconds pass. INTERVAL_US > 0
 * sleeps that long between requests (0: back to back). At the end one line per sample on stdout:
 * "i MICROSECONDS" for the idle phase, "m MICROSECONDS STATUS" for the migration phase, then "end".
 * Lines that are not answers (events) are skipped. Exit status 0, or 1 with a message on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536
#define MAX_SAMPLES 2000000

static char buf[BUF];
static size_t have;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void die(const char *what)
{
    fprintf(stderr, "qmp_probe: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* One line of the reply stream into line (NUL-terminated, without CR LF); reads as needed. */
static void read_line(int fd, char *line, size_t size)
{
    for (;;) {
        char *nl = memchr(buf, '\n', have);
        if (nl != NULL) {
            size_t n = (size_t)(nl - buf) + 1;
            size_t keep = n - 1 < size - 1 ? n - 1 : size - 1;
            memcpy(line, buf, keep);
            line[keep] = '\0';
            memmove(buf, buf + n, have - n);
            have -= n;
            return;
        }
        if (have == BUF)
            have = 0; /* a line longer than the buffer: not an answer we need */
        ssize_t r = read(fd, buf + have, BUF - have);
        if (r == 0) {
            errno = ECONNRESET;
            die("read");
        }
        if (r < 0) {
            if (errno == EINTR)
                continue;
            die("read");
        }
        have += (size_t)r;
    }
}

/* The next answer (a line with "return" or "error"); events are skipped. */
static void read_answer(int fd, char *line, size_t size)
{
    for (;;) {
        read_line(fd, line, size);
        if (strstr(line, "\"return\"") != NULL || strstr(line, "\"error\"") != NULL)
            return;
    }
}

static void send_all(int fd, const char *s)
{
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = write(fd, s, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            die("write");
        }
        s += w;
        n -= (size_t)w;
    }
}

/* The value of the answer's first "status" member (query-migrate puts its own first), into out. */
static void status_of(const char *line, char *out, size_t size)
{
    const char *p = strstr(line, "\"status\": \"");
    size_t i = 0;
    if (p != NULL)
        for (p += 11; *p != '\0' && *p != '"' && i < size - 1; p++)
            out[i++] = *p;
    out[i] = '\0';
    if (i == 0)
        snprintf(out, size, "none");
}

static int terminal(const char *s)
{
    return strcmp(s, "completed") == 0 || strcmp(s, "failed") == 0 || strcmp(s, "cancelled") == 0;
}

struct sample {
    float us;
    char phase;
    char status[15];
};

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: qmp_probe SOCKET IDLE_S MAX_S INTERVAL_US\n");
        return 2;
    }
    double idle_s = atof(argv[2]), max_s = atof(argv[3]);
    long interval_us = atol(argv[4]);
    static char line[BUF];
    static const char query[] = "{\"execute\": \"query-migrate\"}\n";

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(argv[1]) >= sizeof addr.sun_path) {
        fprintf(stderr, "qmp_probe: socket path too long\n");
        return 1;
    }
    strcpy(addr.sun_path, argv[1]);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("connect");
    read_line(fd, line, sizeof line); /* the greeting */
    send_all(fd, "{\"execute\": \"qmp_capabilities\"}\n");
    read_answer(fd, line, sizeof line);

    struct sample *samples = calloc(MAX_SAMPLES, sizeof *samples);
    if (samples == NULL)
        die("calloc");
    size_t n = 0;
    struct timespec pause = {.tv_sec = interval_us / 1000000, .tv_nsec = (interval_us % 1000000) * 1000};
    for (int phase = 0; phase < 2; phase++) {
        double end = now() + (phase == 0 ? idle_s : max_s);
        if (phase == 1) {
            printf("ready\n");
            fflush(stdout);
            if (fgets(line, sizeof line, stdin) == NULL)
                return 1;
        }
        while (n < MAX_SAMPLES && now() < end) {
            double t0 = now();
            send_all(fd, query);
            read_answer(fd, line, sizeof line);
            double t1 = now();
            struct sample *s = &samples[n++];
            s->us = (float)((t1 - t0) * 1e6);
            s->phase = phase == 0 ? 'i' : 'm';
            status_of(line, s->status, sizeof s->status);
            if (phase == 1 && terminal(s->status))
                break;
            if (interval_us > 0)
                nanosleep(&pause, NULL);
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (samples[i].phase == 'i')
            printf("i %.1f\n", samples[i].us);
        else
            printf("m %.1f %s\n", samples[i].us, samples[i].status);
    }
    printf("end\n");
    return 0;
}
