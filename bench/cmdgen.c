/* downlink50's command clients, cheap enough that the figure is relayd's (issue 12).
 *
 *     .venv/bench-bin/cmdgen HOST WS_PORT CMD_PORT DEV_PORT FIRST COUNT RATE SAMPLE
 *
 * Runs COUNT WebSocket clients (ids FIRST ...) in this one process, on connections
 * subscribed to CMD_PORT (device-less: no fan-out of their own). Once they are open
 * it prints "ready" and reads "START UNTIL FROM" (CLOCK_MONOTONIC seconds, which is
 * what Python's time.monotonic() reads on Linux) from stdin; then the clients send
 * RATE JSON commands/s each to port DEV_PORT from START to UNTIL, round robin: the
 * k-th command of the process is due at START + k / (RATE * COUNT) and goes then
 * (an absolute timerfd in the epoll set; no busy waiting). Sampled commands sent
 * from FROM on have their send time as "id" too: the ack that relayd writes while
 * it handles the command gives the round trip client -> relayd -> client (ack_us),
 * without the device side. Used by bench/downlink.py.
 *
 * Cheap by construction: epoll over raw sockets, no WebSocket library; every
 * command is a frame built once per client (a zero mask key is a valid mask that
 * leaves the payload as it is, RFC 6455 5.3); only one command in SAMPLE carries
 * its send time ("C...", built when sent), the others are constant ("c..."). A
 * write the kernel does not take whole waits in the client's buffer for EPOLLOUT
 * (counted: "blocked"). Answers are counted by walking frame headers (7-, 16- and
 * 64-bit lengths, frames cut anywhere by reads); a payload is only looked into when
 * it is not an ack or is the ack of a sampled command. Pings are answered. Prints
 * one JSON line: sent, acked, errors, first_error, cpu_pct, blocked, ack_us. Any
 * error: one line on stderr, exit status 1. CMDGEN_SNDBUF=bytes in the environment
 * sets the sockets' SO_SNDBUF (for tests of partial writes).
 *
 * Plain C11 and libc; `make bench-deps` builds it with $(CC) (gcc from Debian's
 * build-essential) into .venv/bench-bin/cmdgen.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define INCAP 16384      /* bytes read and not yet parsed, per client */
#define OUTCAP 65536     /* per client: ~8 s of its commands at 100/s, then an error */
#define PEEK 256         /* payload bytes looked into before a frame is judged */
#define ERRLEN 200       /* first_error keeps this much of the answer */
#define TIMER UINT32_MAX /* the timerfd's epoll tag (clients are tagged by index) */
#define FRAME 192        /* room for a command's frame (its JSON: under 160 bytes) */

typedef struct {
    int fd, id;                 /* id: FIRST + its index */
    uint32_t index;             /* its epoll tag */
    unsigned char in[INCAP];    /* read, not yet parsed: at most one frame's start */
    unsigned char out[OUTCAP];  /* not taken by the kernel yet */
    size_t inlen, outlen;
    uint64_t skip;              /* the rest of a frame already judged, to drop */
    unsigned char plain[FRAME]; /* this client's constant command frame */
    size_t plainlen;
} Client;

/* What the clients share: the epoll set and the counts of the JSON line. */
typedef struct {
    int epfd;
    long blocked; /* writes the kernel did not take whole */
    long acked, errors;
    unsigned char first_error[ERRLEN];
    size_t first_error_len;
    int64_t *ack_us; /* sampled commands: send -> ack read, in µs */
    size_t n_ack_us, cap_ack_us;
} Run;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("cmdgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static int64_t now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static long arg(const char *s, long lo, long hi, const char *name) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi)
        die("%s must be an integer in %ld..%ld, not \"%.40s\"", name, lo, hi, s);
    return v;
}

/* A client's text frame with the zero mask key around `n` payload bytes at `p`. */
static size_t masked_text(unsigned char *dst, const char *p, size_t n) {
    size_t h = 2;
    dst[0] = 0x81;
    if (n < 126) {
        dst[1] = (unsigned char)(0x80 | n);
    } else {
        dst[1] = 0x80 | 126;
        dst[2] = (unsigned char)(n >> 8);
        dst[3] = (unsigned char)n;
        h = 4;
    }
    memset(dst + h, 0, 4);
    memcpy(dst + h + 4, p, n);
    return h + 4 + n;
}

/* A command: its data is what bench/downlink.py's devices read, 33 bytes: kind (C
 * sampled, c not), client, seq, send time (µs). With an "id" when ident >= 0. */
static size_t command_frame(unsigned char *dst, int dev_port, char kind, int cid, long seq,
                            int64_t ts_us, int64_t ident) {
    char p[160];
    int n = snprintf(p, sizeof p, "{\"port\": %d, \"data\": \"%c%03d %07ld %016lld\"", dev_port,
                     kind, cid, seq, (long long)ts_us);
    n += ident < 0 ? snprintf(p + n, sizeof p - (size_t)n, "}")
                   : snprintf(p + n, sizeof p - (size_t)n, ", \"id\": %lld}", (long long)ident);
    return masked_text(dst, p, (size_t)n);
}

static void watch(Run *r, Client *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.u32 = c->index};
    if (epoll_ctl(r->epfd, op, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
}

/* Write a frame: what the kernel does not take now waits for EPOLLOUT. */
static void put(Run *r, Client *c, const unsigned char *p, size_t n) {
    if (c->outlen == 0) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno != EAGAIN)
            die("client %d: send: %s", c->id, strerror(errno));
        if (w == (ssize_t)n)
            return;
        w = w < 0 ? 0 : w;
        p += w, n -= (size_t)w;
        r->blocked++;
        watch(r, c, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD);
    }
    if (c->outlen + n > OUTCAP)
        die("client %d: over %d bytes wait to be sent: relayd does not read", c->id, OUTCAP);
    memcpy(c->out + c->outlen, p, n);
    c->outlen += n;
}

static void writable(Run *r, Client *c) {
    ssize_t w = send(c->fd, c->out, c->outlen, MSG_NOSIGNAL);
    if (w < 0 && errno == EAGAIN)
        return;
    if (w < 0)
        die("client %d: send: %s", c->id, strerror(errno));
    c->outlen -= (size_t)w;
    memmove(c->out, c->out + w, c->outlen);
    if (c->outlen == 0)
        watch(r, c, EPOLLIN, EPOLL_CTL_MOD);
}

/* One answer, by its first n (<= PEEK) bytes: an ack (timed if it has an id) or not. */
static void answer(Run *r, const unsigned char *p, size_t n) {
    static const char ACK[] = "{\"ack\": ";
    size_t i = sizeof ACK - 1;
    if (n < i || memcmp(p, ACK, i) != 0) {
        if (r->errors++ == 0) {
            r->first_error_len = n < ERRLEN ? n : ERRLEN;
            memcpy(r->first_error, p, r->first_error_len);
        }
        return;
    }
    r->acked++;
    if (i >= n || p[i] < '0' || p[i] > '9')
        return; /* "null": an unsampled command */
    int64_t sent_us = 0;
    for (; i < n && p[i] >= '0' && p[i] <= '9'; i++)
        sent_us = sent_us * 10 + (p[i] - '0');
    if (r->n_ack_us == r->cap_ack_us) {
        r->cap_ack_us = r->cap_ack_us ? 2 * r->cap_ack_us : 4096;
        r->ack_us = realloc(r->ack_us, r->cap_ack_us * sizeof *r->ack_us);
        if (!r->ack_us)
            die("out of memory");
    }
    r->ack_us[r->n_ack_us++] = now_ns(CLOCK_MONOTONIC) / 1000 - sent_us;
}

/* The frames in c->in, each judged once its first PEEK bytes are here; the rest kept. */
static void frames(Run *r, Client *c) {
    const unsigned char *b = c->in;
    size_t i = 0, n = c->inlen;
    while (n - i >= 2) {
        uint64_t len = b[i + 1] & 0x7F;
        size_t head = 2;
        if (b[i + 1] & 0x80)
            die("client %d: a masked frame from relayd", c->id);
        if (len == 126) {
            if (n - i < 4)
                break;
            len = (uint64_t)b[i + 2] << 8 | b[i + 3];
            head = 4;
        } else if (len == 127) {
            if (n - i < 10)
                break;
            len = 0;
            for (size_t k = 2; k < 10; k++)
                len = len << 8 | b[i + k];
            head = 10;
        }
        size_t have = n - i - head, peek = len < PEEK ? (size_t)len : PEEK;
        if (have < peek)
            break;
        int op = b[i] & 0x0F;
        if (op == 1) {
            answer(r, b + i + head, peek);
        } else if (op == 8) { /* a close: its code and reason, printable ASCII only */
            const unsigned char *why = b + i + head;
            int k = 2;
            while (k < (int)peek && k < 100 && why[k] >= 0x20 && why[k] < 0x7F)
                k++;
            die("client %d: relayd closed the WebSocket: %d %.*s", c->id,
                peek >= 2 ? why[0] << 8 | why[1] : 1005, peek >= 2 ? k - 2 : 0, why + 2);
        } else if (op == 9 && len <= 125) { /* a ping: its pong, with the zero mask key */
            unsigned char pong[6 + 125] = {0x8A, (unsigned char)(0x80 | len)};
            memcpy(pong + 6, b + i + head, peek);
            put(r, c, pong, 6 + peek);
        }
        if (len > have) { /* judged: the rest is dropped as it comes */
            c->skip = len - have;
            i = n;
            break;
        }
        i += head + (size_t)len;
    }
    c->inlen = n - i;
    memmove(c->in, b + i, c->inlen);
}

static void readable(Run *r, Client *c) {
    ssize_t got = recv(c->fd, c->in + c->inlen, INCAP - c->inlen, 0);
    if (got < 0 && errno == EAGAIN)
        return;
    if (got < 0)
        die("client %d: recv: %s", c->id, strerror(errno));
    if (got == 0)
        die("client %d: relayd closed the connection", c->id);
    size_t drop = c->skip < (uint64_t)got ? (size_t)c->skip : (size_t)got;
    c->skip -= drop;
    memmove(c->in + c->inlen, c->in + c->inlen + drop, (size_t)got - drop);
    c->inlen += (size_t)got - drop;
    frames(r, c);
}

/* A random Sec-WebSocket-Key: 16 bytes in base64 (24 characters). */
static void ws_key(char key[25]) {
    static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    unsigned char b[18] = {0};
    if (getrandom(b, 16, 0) != 16)
        die("getrandom: %s", strerror(errno));
    for (int i = 0; i < 6; i++) {
        uint32_t v = (uint32_t)b[3 * i] << 16 | (uint32_t)b[3 * i + 1] << 8 | b[3 * i + 2];
        for (int k = 0; k < 4; k++)
            key[4 * i + k] = B64[v >> (18 - 6 * k) & 63];
    }
    key[22] = key[23] = '=';
    key[24] = 0;
}

/* Connected, upgraded (relayd's 101 checked), then non-blocking. */
static void open_client(Client *c, const struct addrinfo *ai, const char *host, long cmd_port,
                        int sndbuf) {
    struct timeval tv = {.tv_sec = 30}; /* for connect, the request and its answer */
    int err = 0;
    for (; ai; ai = ai->ai_next) {
        if ((c->fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol)) < 0) {
            err = errno;
            continue;
        }
        setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        if (sndbuf > 0)
            setsockopt(c->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
        if (connect(c->fd, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        err = errno;
        close(c->fd);
    }
    if (!ai)
        die("client %d: cannot connect to relayd: %s", c->id, strerror(err));
    char key[25], req[512];
    ws_key(key);
    int n = snprintf(req, sizeof req,
                     "GET /ws?format=json&port=%ld HTTP/1.1\r\nHost: %s\r\n"
                     "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     cmd_port, host, key);
    if (send(c->fd, req, (size_t)n, MSG_NOSIGNAL) != n)
        die("client %d: sending the upgrade request: %s", c->id, strerror(errno));
    char *end = NULL;
    while (!end) {
        if (c->inlen == 4096)
            die("client %d: no end to relayd's HTTP answer in 4096 bytes", c->id);
        ssize_t got = recv(c->fd, c->in + c->inlen, 4096 - c->inlen, 0);
        if (got <= 0)
            die("client %d: no answer to the upgrade request: %s", c->id,
                got == 0 ? "connection closed" : strerror(errno));
        c->inlen += (size_t)got;
        end = memmem(c->in, c->inlen, "\r\n\r\n", 4);
    }
    if (c->inlen < 12 || memcmp(c->in, "HTTP/1.1 101", 12) != 0) {
        int k = 0;
        while (k < 80 && c->in[k] >= 0x20 && c->in[k] < 0x7F)
            k++;
        die("client %d: upgrade refused: %.*s", c->id, k, (char *)c->in);
    }
    c->inlen -= (size_t)(end + 4 - (char *)c->in);
    memmove(c->in, end + 4, c->inlen); /* frames right behind the 101 */
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* as asyncio's */
    if (fcntl(c->fd, F_SETFL, O_NONBLOCK) < 0)
        die("fcntl: %s", strerror(errno));
}

static void arm(int tfd, int64_t at_ns) {
    struct itimerspec it = {.it_value = {at_ns / 1000000000, at_ns % 1000000000}};
    if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &it, NULL) < 0)
        die("timerfd_settime: %s", strerror(errno));
}

/* The result line; first_error as a JSON string (relayd's answers are ASCII JSON:
 * any other byte becomes U+FFFD). */
static void result(const Run *r, long sent, double cpu_pct) {
    printf("{\"sent\": %ld, \"acked\": %ld, \"errors\": %ld, \"first_error\": ", sent, r->acked,
           r->errors);
    if (r->errors) {
        putchar('"');
        for (size_t i = 0; i < r->first_error_len; i++) {
            unsigned char ch = r->first_error[i];
            if (ch == '"' || ch == '\\')
                printf("\\%c", ch);
            else if (ch < 0x20 || ch == 0x7F)
                printf("\\u%04x", ch);
            else if (ch > 0x7F)
                fputs("\\ufffd", stdout);
            else
                putchar(ch);
        }
        putchar('"');
    } else {
        fputs("null", stdout);
    }
    printf(", \"cpu_pct\": %.1f, \"blocked\": %ld, \"ack_us\": [", cpu_pct, r->blocked);
    for (size_t i = 0; i < r->n_ack_us; i++)
        printf(i ? ", %lld" : "%lld", (long long)r->ack_us[i]);
    puts("]}");
}

int main(int argc, char **argv) {
    if (argc != 9)
        die("usage: cmdgen HOST WS_PORT CMD_PORT DEV_PORT FIRST COUNT RATE SAMPLE");
    const char *host = argv[1];
    long cmd_port = arg(argv[3], 1, 65535, "CMD_PORT");
    int dev_port = (int)arg(argv[4], 1, 65535, "DEV_PORT");
    int first = (int)arg(argv[5], 0, 999, "FIRST");
    long count = arg(argv[6], 1, 1000 - first, "COUNT"); /* ids have 3 digits */
    long sample = arg(argv[8], 1, 1L << 30, "SAMPLE");
    arg(argv[2], 1, 65535, "WS_PORT");
    char *end;
    double rate = strtod(argv[7], &end);
    if (*end || end == argv[7] || !(rate > 0 && rate <= 1e6))
        die("RATE must be a number of commands/s in (0, 1e6], not \"%.40s\"", argv[7]);

    const char *env = getenv("CMDGEN_SNDBUF"); /* tests: small buffers, partial writes */
    int sndbuf = env ? (int)arg(env, 0, 1 << 24, "CMDGEN_SNDBUF") : 0;

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    int gai = getaddrinfo(host, argv[2], &hints, &ai);
    if (gai)
        die("%s: %s", host, gai_strerror(gai));
    Run run = {.epfd = epoll_create1(0)};
    Client *clients = calloc((size_t)count, sizeof *clients);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    if (run.epfd < 0 || tfd < 0 || !clients)
        die("set-up: %s", strerror(errno));
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = TIMER};
    if (epoll_ctl(run.epfd, EPOLL_CTL_ADD, tfd, &tev) < 0)
        die("epoll_ctl: %s", strerror(errno));
    for (long k = 0; k < count; k++) {
        Client *c = &clients[k];
        c->id = first + (int)k, c->index = (uint32_t)k;
        open_client(c, ai, host, cmd_port, sndbuf);
        c->plainlen = command_frame(c->plain, dev_port, 'c', c->id, 0, 0, -1);
        watch(&run, c, EPOLLIN, EPOLL_CTL_ADD);
        frames(&run, c); /* any that came right behind the 101 */
    }
    freeaddrinfo(ai);
    fputs("ready\n", stdout);
    fflush(stdout);

    char line[256];
    double start_s, until_s, from_s;
    if (!fgets(line, sizeof line, stdin) ||
        sscanf(line, "%lf %lf %lf", &start_s, &until_s, &from_s) != 3)
        die("expected \"START UNTIL FROM\" on stdin");
    int64_t start = (int64_t)(start_s * 1e9), until = (int64_t)(until_s * 1e9);
    int64_t from_us = (int64_t)(from_s * 1e6);
    double step = 1e9 / (rate * (double)count); /* ns between two commands of this process */
    long sent = 0;
    int64_t due = start, cpu0 = now_ns(CLOCK_PROCESS_CPUTIME_ID), cpu = -1;
    int64_t deadline = until + 5000000000LL; /* for the last answers: 5 s */
    arm(tfd, due);
    for (;;) {
        int64_t now = now_ns(CLOCK_MONOTONIC);
        if (cpu >= 0 && (run.acked + run.errors >= sent || now >= deadline))
            break;
        int wait = cpu < 0 ? -1 : (int)((deadline - now) / 1000000 + 1);
        struct epoll_event ev[64];
        int n = epoll_wait(run.epfd, ev, 64, wait);
        if (n < 0 && errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
        for (int e = 0; e < n; e++) {
            if (ev[e].data.u32 != TIMER) {
                Client *c = &clients[ev[e].data.u32];
                if (ev[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                    readable(&run, c);
                if (ev[e].events & EPOLLOUT && c->outlen)
                    writable(&run, c);
                continue;
            }
            uint64_t ticks;
            if (read(tfd, &ticks, sizeof ticks) < 0 && errno != EAGAIN)
                die("timerfd: %s", strerror(errno));
            now = now_ns(CLOCK_MONOTONIC);
            for (; due <= now && due < until; due = start + (int64_t)(++sent * step)) {
                Client *c = &clients[sent % count];
                if (sent % sample) {
                    put(&run, c, c->plain, c->plainlen);
                    continue;
                }
                unsigned char f[FRAME];
                int64_t ts = now_ns(CLOCK_MONOTONIC) / 1000;
                put(&run, c, f, command_frame(f, dev_port, 'C', c->id, sent / count, ts,
                                              ts >= from_us ? ts : -1));
            }
            if (due < until) {
                arm(tfd, due);
            } else if (now < until) {
                arm(tfd, until); /* the end of the sending, for the CPU share */
            } else if (cpu < 0) {
                cpu = now_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu0;
            }
        }
    }
    for (long k = 0; k < count; k++)
        close(clients[k].fd);
    result(&run, sent, until > start ? 100.0 * (double)cpu / (double)(until - start) : 0.0);
    return 0;
}
