/*
 * tunnelkit's native relay engine: accept, connect, relay and close plain
 * TCP/UNIX tunnels without running Python per connection or per chunk.
 *
 * Why: a short connection cost tunnelkit's Twisted path about 165 us of CPU
 * (accept, a non-blocking connect, two transports, Deferreds, four closes),
 * nginx about 33 us, and a keep-alive request about 11 us against HAProxy's
 * 7.6 us (docs/performance.md). That cost is Python's, not the kernel's, so
 * the hot path of plain forwarding lives here, and Python keeps everything
 * that is policy or configuration: endpoint parsing and listening (Twisted),
 * the client policy (a Python callable), logging (records handed back in
 * batches), drain and signals.
 *
 * How it fits Twisted: on tunnelkit's reactor, the engine does the reactor's
 * waiting (Engine.wait(), with the reactor's epoll descriptor nested in the
 * engine's), sweeps its own timers, and returns to Python only when Python
 * has work. On another reactor, the engine's epoll descriptor is watched
 * like any socket, Engine.run() handles what is ready and Engine.tick()
 * sweeps the timers. Everything runs on the reactor thread; no lock, no
 * thread (the GIL is released only while epoll_wait blocks).
 *
 * The relay keeps the promises of tunnelkit/relay/tunnel.py: full duplex,
 * backpressure (a direction whose destination refuses bytes stops reading
 * its source, and at most one read is held per direction), half-close
 * (EOF becomes shutdown(SHUT_WR) on the other side once what was read is
 * sent), resets passed on as resets unless the reset side had already sent
 * its FIN, a lingering close (a side closed while it may still send gets
 * SHUT_WR and is read until it closes, so the kernel sends no RST), connect
 * timeout with failover to the next backend, idle, fin and close-grace
 * timeouts, and one record per tunnel. Each connection's backend is picked
 * here too, from the listener's Pool (see "balancing"), as tunnelkit/backends
 * picks on Twisted's plane.
 *
 * TLS termination (--tls-cert with plain TCP/UNIX listeners): Python makes
 * each client's OpenSSL connection with pyOpenSSL, from the same contexts,
 * SNI choice, ALPN and client-certificate rules as Twisted's path, and hands
 * over its SSL pointer; the engine drives the handshake and the relay with
 * OpenSSL's own functions, whose addresses Python takes from pyOpenSSL's
 * bindings (so no OpenSSL headers or second libssl are needed here, and the
 * calls reach the library that made the SSL object). The backend is dialled
 * once the handshake is done; close_notify and a bare FIN are both the
 * client's EOF, and the backend's EOF becomes close_notify then a FIN.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <linux/sockios.h>

#define MAX_EVENTS 256
#define MAX_BACKENDS 64
#define MAX_LISTENERS 64
#define ACCEPTS_PER_EVENT 64
#define PIPE_CAPACITY (1 << 20)
#define PIPES_KEPT 64
/* Tunnels served from the ready queue per run(): the bound on how long a
 * busy engine keeps the reactor (timers, other sockets) waiting. */
#define QUEUE_BUDGET 128
/* Seconds between timer sweeps while tunnels exist: the resolution of the
 * connect, handshake, idle, fin and close-grace timeouts. */
#define TICK 0.1
/* Records wait()'s loop lets pile up before it hands them to Python. */
#define RECORD_BATCH 64

enum { CLIENT = 0, BACKEND = 1, PROXY = 2 };
enum { K_FIN = 0, K_RST, K_TIMEOUT, K_ERROR, K_SHUTDOWN };
enum { S_CONNECTING = 0, S_JOINED, S_CLOSING, S_DEAD, S_HANDSHAKE };
/* OpenSSL's SSL_get_error() results, stable since 0.9.x. */
enum {
    TLS_ERROR_SSL = 1,
    TLS_WANT_READ = 2,
    TLS_WANT_WRITE = 3,
    TLS_ERROR_SYSCALL = 5,
    TLS_ZERO_RETURN = 6,
};
/* Room for one TLS record's plaintext: an SSL_read into at least this much
 * leaves nothing decrypted behind, so socket readiness alone says when to read. */
#define TLS_RECORD 16384
/* epoll tags: a tunnel's pointer with its side (CLIENT, BACKEND) in the low
 * bits, a listener's pointer with TAG_LISTENER, or one of the two TAG_WAKE
 * descriptors: the engine's eventfd (TAG_WAKE) or the reactor's own epoll
 * descriptor, when the engine does the reactor's waiting (TAG_REACTOR). */
enum { TAG_LISTENER = 2, TAG_WAKE = 3, TAG_REACTOR = 4 | TAG_WAKE };
/* How a tunnel's socket is registered, once, for its whole life. */
#define SOCKET_EVENTS (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI | EPOLLET)

/* The values of tunnelkit.relay.tunnel.Side and CloseKind, by C value:
 * exported as SIDES and CLOSE_KINDS (a test holds them against Python's). */
static const char *SIDE_NAMES[] = {"client", "backend", "proxy"};
static const char *KIND_NAMES[] = {"FIN", "RST", "timeout", "error", "shutdown"};
/* A record's fields, in order (exported as RECORD_FIELDS): the listener
 * index, then TunnelRecord's fields as C knows them (closed_by and
 * close_kind as indexes into SIDES and CLOSE_KINDS), whether it spliced,
 * (pyOpenSSL Connection, handshaken) for a TLS client else None, and the
 * tunnel's Profile. */
static const char *RECORD_FIELDS[] = {
    "listener",  "client",    "backend",   "backend_address", "attempts", "bytes_up",
    "bytes_down", "duration", "connect_time", "closed_by",   "close_kind", "reason",
    "spliced",   "tls",       "profile",
};

/* How a pool picks a backend for each attempt (exported as BALANCES, in
 * this order; see pick()). */
enum { B_FIRST = 0, B_ROUND_ROBIN, B_LEAST_CONN, B_RANDOM, B_SOURCE_HASH, N_BALANCES };
static const char *BALANCE_NAMES[N_BALANCES] = {"first", "round-robin", "least-conn", "random",
                                                "source-hash"};
/* Weights are in the units of tunnelkit.backends.balance (WEIGHT_SCALE = 16
 * per configured unit, so a slow start can ramp a weight-1 backend by
 * steps): a configured 256 is 4096. */
#define MAX_WEIGHT 4096

/* One backend of a pool: where it is, what Python sets (weight, backup,
 * health), and what the engine keeps of it (connections now, consecutive
 * failures, passive ejection, the round-robin's current weight, totals). */
typedef struct {
    struct sockaddr_storage addr;
    socklen_t len;
    uint64_t key;          /* fnv1a64 of its name: its source-hash key */
    int weight;            /* 0..MAX_WEIGHT; 0: drained, never picked */
    int backup;            /* picked only when no primary may be */
    int up;                /* health, as Python's checks say */
    long active;           /* attempts to it and tunnels joined to it, now */
    int failures;          /* failed attempts in a row */
    int ejections;         /* ejections since it last connected: the backoff's exponent */
    double ejected_until;  /* now() until which passive ejection skips it (0: never ejected) */
    long long current;     /* smooth weighted round-robin's current weight */
    unsigned long long connections, failed; /* tunnels joined to it; failed attempts */
} backend_t;

/* A listener's backends and how each connection picks among them: shared
 * by the profiles that name it (set_profile() keeps the state of the
 * backends), and by their tunnels. Python pushes health and weights
 * (Pool.set); the engine keeps active counts and passive ejection itself. */
typedef struct pool {
    PyObject_HEAD
    int n;
    backend_t *backends; /* n of them */
    PyObject *names;     /* tuple of n str */
    int balance;
    int retries;         /* attempts after the first; -1: every backend once */
    long max_conn;       /* per backend; 0: no limit */
    int eject_after;     /* failures in a row that eject a backend; 0: no passive ejection */
    double eject_base, eject_max;
    PyObject *on_change; /* callable(index, up, reason), or NULL */
    int cursor;          /* least-conn's rotating start, for ties */
    uint64_t rng;        /* random's state (splitmix64) */
} Pool;

typedef struct {
    int fd;
    int id;
} listener_t;

/* One direction of a tunnel: bytes read from side `from`, sent to the other. */
typedef struct {
    char *buf;          /* bytes read but not yet sent (malloc'd on demand) */
    size_t off, len;
    int pipe_r, pipe_w; /* splice pipe, held only while bytes sit in it */
    size_t piped;
    unsigned eof : 1;   /* EOF read from the source */
    unsigned shut : 1;  /* shutdown(SHUT_WR) sent to the destination */
    unsigned notify : 1; /* close_notify owed to a TLS destination before its FIN */
    unsigned long long bytes;
} dir_t;

typedef struct tunnel {
    struct tunnel *prev, *next;
    struct tunnel *qprev, *qnext; /* in the ready queue when queued */
    int fd[2];
    uint32_t want[2];   /* what each side waits for (EPOLLIN, EPOLLOUT, EPOLLRDHUP) */
    uint32_t ready[2];  /* what epoll said of it, until a call says otherwise */
    dir_t dir[2];       /* dir[CLIENT]: client -> backend; dir[BACKEND]: backend -> client */
    int state;
    int listener_id;
    struct profile *profile; /* a reference: what the listener was set to when the tunnel began */
    int backend_index;    /* the backend of the attempt or of the join; -1: none */
    int attempts;         /* connect attempts made */
    uint64_t tried;       /* the backends attempted, by index (MAX_BACKENDS bits) */
    int splicing;
    int spliced;
    int last_timed_out;   /* the last backend attempt hit the connect timeout */
    double started, connected, last_moved;
    double deadline;   /* connect attempt, while connecting */
    double fin_at;     /* fin timeout, once half-closed (0: none) */
    double grace_at;   /* close grace, once closing (0: none) */
    int noted, closed_by, close_kind;
    void *ssl;         /* the client's OpenSSL connection (TLS listeners), else NULL */
    PyObject *tls;     /* the pyOpenSSL Connection that owns ssl */
    unsigned queued : 1;
    unsigned handshaken : 1;
    unsigned notified : 1;          /* close_notify sent (or given up) */
    unsigned read_wants_write : 1;  /* SSL_read must be retried once the client is writable */
    unsigned write_pending : 1;     /* an SSL_write waits to be retried: no SSL_read meanwhile */
    unsigned counted : 1;           /* counted in its backend's active (see count_out) */
    unsigned limited : 1;           /* counted in its profile's ClientTable (see limit_release) */
    uint32_t owed;     /* bytes the closing sides still had to take at the last grace check */
    /* Allocated when first needed, to keep an idle tunnel small. */
    char *reason;
    char *errors; /* failed backend attempts, "name: why; ..." */
    struct sockaddr_storage peer;
    socklen_t peer_len;
} tunnel_t;

/* The OpenSSL functions the engine calls, by address (see the top of the file). */
typedef struct {
    int (*do_handshake)(void *ssl);
    int (*read)(void *ssl, void *buf, int len);
    int (*write)(void *ssl, const void *buf, int len);
    int (*shutdown)(void *ssl);
    int (*get_error)(const void *ssl, int ret);
    void (*clear_error)(void);
    unsigned long (*next_error)(void);
    const char *(*reason)(unsigned long code);
} tls_api_t;

/* A listener's profile: how its tunnels are served (backends, timeouts,
 * socket options, TLS, logging, client policy). Immutable once made, and
 * shared: each tunnel holds a reference to the profile its listener had when
 * it was accepted, so set_profile() changes new connections only and a
 * profile lives while a listener or a tunnel uses it. */
typedef struct profile {
    PyObject_HEAD
    size_t read_size;
    size_t bulk_read;
    int splice_mode; /* 0 off, 1 auto, 2 on */
    double idle, fin, grace, connect_timeout;
    int half_close; /* 0: the first EOF closes both sides (--no-half-close) */
    int log_records;
    int nodelay, keepalive, sndbuf, rcvbuf, mss;
    Pool *pool;
    PyObject *client_check; /* callable(host, port, listener_id) -> bool, or NULL */
    struct client_table *clients; /* per-client limits, or NULL */
    tls_api_t tls;        /* set when tls_new is */
    PyObject *tls_new;    /* callable(fd) -> (SSL address, pyOpenSSL Connection), or NULL */
    double tls_timeout;   /* --tls-handshake-timeout */
    PyObject *context;    /* Python's own object for this profile (Profile.context) */
    int proxy_protocol;   /* the PROXY header version sent to backends (0: none) */
    PyObject *proxy_tlvs; /* callable(pyOpenSSL Connection) -> bytes: a TLS client's v2 TLVs, or NULL */
} Profile;

/* What each listener index counts, in COUNTER_NAMES' order (the fields of
 * tunnelkit.relay.counters.ListenerCounters, which documents each). */
enum {
    C_ACCEPTED = 0,
    C_REFUSED_CLIENT_POLICY,
    C_REFUSED_CONNECTION_LIMIT,
    C_REFUSED_OUT_OF_FDS,
    C_REFUSED_CLIENT_CONNECTIONS,
    C_REFUSED_CLIENT_RATE,
    C_ACTIVE,
    C_BYTES_UP,
    C_BYTES_DOWN,
    C_CONNECT_FAILURES,
    C_TLS_FAILURES,
    N_COUNTERS,
};
static const char *COUNTER_NAMES[N_COUNTERS] = {
    "accepted",         "refused_client_policy", "refused_connection_limit",
    "refused_out_of_fds", "refused_client_connections", "refused_client_rate",
    "active",           "bytes_up",              "bytes_down",
    "connect_failures", "tls_failures",
};

/* A listener index: its profile for new tunnels and its counters. */
typedef struct {
    Profile *profile; /* NULL: never added (or the engine is closed) */
    int added;
    unsigned long long counters[N_COUNTERS];
} slot_t;

typedef struct {
    PyObject_HEAD
    int epfd;
    int reserve_fd; /* kept free for the EMFILE accept guard */
    long max_tunnels;
    int quiet; /* no records (a dying engine) */
    int running; /* inside run(): ended tunnels may still have events in the batch */
    listener_t listeners[MAX_LISTENERS];
    slot_t slots[MAX_LISTENERS]; /* by listener index */
    PyObject *records;      /* list of record tuples, taken by Python */
    PyObject *notices;      /* list of (name, ...) tuples, taken by Python */
    PyObject *changes;      /* (pool, index, up, reason) for the pools' on_change, once the batch is over */
    char *scratch;
    size_t scratch_size;    /* enough for every profile added (see scratch_for) */
    int pipes[PIPES_KEPT][2];
    int n_pipes;
    long fd_slots;   /* tunnels the descriptor limit has room for (0: no limit); a pipe takes one too */
    long pipes_open; /* pipes made and not closed: pooled or holding bytes */
    tunnel_t head;      /* circular list of live tunnels */
    tunnel_t queue;     /* circular list (qnext/qprev) of tunnels with work the kernel will not announce again */
    int wake_fd;        /* eventfd: readable while the queue was left with work */
    int wake_armed;
    double next_tick;   /* wait()'s next timer sweep */
    tunnel_t *graveyard; /* ended tunnels, freed after the event batch that ended them */
    long active;
    int warned_full;
    int warned_fds; /* accept_failed said for this burst of EMFILE */
} Engine;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* -- small helpers ------------------------------------------------------ */

/* What ends a tunnel is noted once (note); forget() lets a later, truer cause replace it. */
static void forget(tunnel_t *t) {
    t->noted = 0;
    free(t->reason);
    t->reason = NULL;
}

static void note(tunnel_t *t, int side, int kind, const char *fmt, ...) {
    if (t->noted)
        return;
    t->noted = 1;
    t->closed_by = side;
    t->close_kind = kind;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&t->reason, fmt, ap) < 0)
        t->reason = NULL;
    va_end(ap);
}

static PyObject *describe(const struct sockaddr_storage *ss, socklen_t len) {
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        return PyUnicode_FromFormat("%s:%d", host, ntohs(a->sin_port));
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        char scope[IF_NAMESIZE + 1] = "";
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        /* A link-local peer's interface, as Python's socket module writes it. */
        if (a->sin6_scope_id != 0 && if_indextoname(a->sin6_scope_id, scope + 1) != NULL)
            scope[0] = '%';
        return PyUnicode_FromFormat("[%s%s]:%d", host, scope, ntohs(a->sin6_port));
    }
    if (ss->ss_family == AF_UNIX) {
        const struct sockaddr_un *a = (const struct sockaddr_un *)ss;
        size_t n = len > offsetof(struct sockaddr_un, sun_path)
                       ? strnlen(a->sun_path, len - offsetof(struct sockaddr_un, sun_path))
                       : 0;
        /* An unnamed client socket, as most are: empty, as on Twisted's path. */
        return PyUnicode_DecodeFSDefaultAndSize(a->sun_path, n);
    }
    return PyUnicode_FromString("-");
}

static void set_options(const Profile *p, int fd, int family) {
    if (family != AF_INET && family != AF_INET6)
        return;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &p->nodelay, sizeof p->nodelay);
    if (p->keepalive >= 0) {
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &p->keepalive, sizeof p->keepalive);
    }
    if (p->sndbuf >= 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &p->sndbuf, sizeof p->sndbuf);
    if (p->rcvbuf >= 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &p->rcvbuf, sizeof p->rcvbuf);
    if (p->mss >= 0)
        setsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, &p->mss, sizeof p->mss);
}

static void close_abortively(int fd) {
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

/* -- pipes -------------------------------------------------------------------
 *
 * A pipe's two descriptors are a tunnel's worth: the descriptor budget that
 * sized --max-connections (fd_slots tunnels) counts pipes, pooled or holding
 * bytes, as tunnels. A pipe is made only while the budget has room, and a
 * new tunnel that finds it spent takes it back (room_for_tunnel): pooled
 * pipes are closed, then pipes holding bytes are emptied into memory. So
 * splicing never costs a client within the cap its descriptors. */

static inline int over_budget(const Engine *e, long more) {
    return e->fd_slots > 0 && e->active + e->pipes_open + more > e->fd_slots;
}

static void close_pipe(Engine *e, int r, int w) {
    close(r);
    close(w);
    e->pipes_open--;
}

/* Close the pooled pipes (all, or until the budget has room again). */
static void shrink_pool(Engine *e, int all) {
    while (e->n_pipes > 0 && (all || over_budget(e, 0))) {
        e->n_pipes--;
        close_pipe(e, e->pipes[e->n_pipes][0], e->pipes[e->n_pipes][1]);
    }
}

static int take_pipe(Engine *e, dir_t *d) {
    if (d->pipe_r >= 0)
        return 0;
    int p[2];
    if (e->n_pipes > 0) {
        e->n_pipes--;
        p[0] = e->pipes[e->n_pipes][0];
        p[1] = e->pipes[e->n_pipes][1];
    } else {
        if (over_budget(e, 1) || pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
            return -1;
        e->pipes_open++;
        fcntl(p[1], F_SETPIPE_SZ, PIPE_CAPACITY); /* the kernel may refuse: keep its size */
    }
    d->pipe_r = p[0];
    d->pipe_w = p[1];
    return 0;
}

static void give_pipe(Engine *e, dir_t *d) {
    if (d->pipe_r < 0)
        return;
    if (d->piped == 0 && e->n_pipes < PIPES_KEPT && !over_budget(e, 0)) {
        e->pipes[e->n_pipes][0] = d->pipe_r;
        e->pipes[e->n_pipes][1] = d->pipe_w;
        e->n_pipes++;
    } else {
        close_pipe(e, d->pipe_r, d->pipe_w);
    }
    d->pipe_r = d->pipe_w = -1;
    d->piped = 0;
}

/* Move the bytes d's pipe holds into memory, ahead of nothing (a direction
 * holds bytes in its buffer or in its pipe, never both), and close the pipe.
 * 0: done; -1: left as it was (no memory). */
static int spill_pipe(Engine *e, dir_t *d) {
    if (d->pipe_r < 0 || d->len > d->off)
        return -1;
    char *buf = d->piped > 0 ? malloc(d->piped) : NULL;
    if (d->piped > 0 && buf == NULL)
        return -1;
    size_t got = 0;
    while (got < d->piped) {
        ssize_t n = read(d->pipe_r, buf + got, d->piped - got);
        if (n <= 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break; /* cannot happen: the pipe holds piped bytes; keep what came */
        got += n;
    }
    free(d->buf);
    d->buf = buf;
    d->off = 0;
    d->len = got;
    close_pipe(e, d->pipe_r, d->pipe_w);
    d->pipe_r = d->pipe_w = -1;
    d->piped = 0;
    return 0;
}

/* A tunnel was admitted: give back the descriptors pipes borrowed from its budget. */
static void room_for_tunnel(Engine *e) {
    shrink_pool(e, 0);
    for (tunnel_t *t = e->head.next; t != &e->head && over_budget(e, 0); t = t->next)
        for (int s = 0; s < 2 && over_budget(e, 0); s++)
            spill_pipe(e, &t->dir[s]);
}

static inline size_t pending(const dir_t *d) { return (d->len - d->off) + d->piped + d->notify; }

/* A call found side s with nothing to read (EPOLLIN) or no room to write
 * (EPOLLOUT): epoll will say when that changes (see "readiness" below). */
static inline void drained(tunnel_t *t, int s, uint32_t what) { t->ready[s] &= ~what; }

/* -- TLS ----------------------------------------------------------------------- */

/* The reasons OpenSSL queued, ", "-joined as tunnelkit.tls.server.openssl_reason
 * does, else what the system call said. Empties the queue. */
static void tls_reason(const tls_api_t *tls, int err, int saved_errno, char *out, size_t size) {
    size_t used = 0;
    unsigned long code;
    out[0] = '\0';
    while ((code = tls->next_error()) != 0) {
        const char *reason = tls->reason(code);
        if (reason == NULL || used + 1 >= size)
            continue;
        int n = snprintf(out + used, size - used, "%s%s", used ? ", " : "", reason);
        used = n < 0 ? used : (size_t)n >= size - used ? size - 1 : used + n;
    }
    if (used == 0)
        snprintf(out, size, "%s",
                 err == TLS_ERROR_SYSCALL && saved_errno != 0 ? strerror(saved_errno)
                 : err == TLS_ERROR_SSL                      ? "protocol error"
                                                             : "the client closed the connection");
}

/* SSL_write as much of buf as the client's socket takes, as send() would:
 * the count taken, or -1 with errno (EAGAIN when nothing was taken). A retry
 * must offer the same bytes again (OpenSSL may hold an encrypted record of
 * them); the relay does, from its held buffer (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER).
 * While OpenSSL holds such a record, the client is not read (see may_read). */
static ssize_t tls_send(tunnel_t *t, const char *buf, size_t len) {
    size_t done = 0;
    while (done < len) {
        int chunk = len - done > (1 << 30) ? (1 << 30) : (int)(len - done);
        t->profile->tls.clear_error();
        errno = 0;
        int n = t->profile->tls.write(t->ssl, buf + done, chunk);
        if (n > 0) {
            t->write_pending = 0;
            done += n;
            continue;
        }
        int saved = errno;
        int err = t->profile->tls.get_error(t->ssl, n);
        t->write_pending = err == TLS_WANT_WRITE; /* a record of buf is held */
        if (err == TLS_WANT_WRITE || err == TLS_WANT_READ || done > 0)
            break; /* an error shows again at the next call */
        if (err == TLS_ERROR_SSL) {
            char why[256];
            tls_reason(&t->profile->tls, err, saved, why, sizeof why);
            note(t, CLIENT, K_ERROR, "client TLS error: %s", why);
        }
        t->profile->tls.clear_error();
        errno = saved ? saved : EPIPE;
        return -1;
    }
    if (done == 0 && len > 0) {
        errno = EAGAIN;
        return -1;
    }
    return (ssize_t)done;
}

/* MSG_MORE (SPLICE_F_MORE) for bytes to the backend once the client has sent
 * its FIN: they are its last, so they wait in the kernel for the FIN that
 * follows (shutdown or close) and leave with it, in one segment. A backend
 * flooded with connections completes them with SYN cookies and may drop the
 * first segments on a full accept queue; the cookie is then checked again in
 * a later segment, which passes only if it starts at the first byte: a lone
 * FIN behind the dropped bytes fails and is answered with a reset. (HAProxy
 * sends its last bytes with MSG_MORE before a shutdown for the same merge.) */
static inline int last_bytes(const tunnel_t *t, int to, int more) {
    return to == BACKEND && (t->ready[CLIENT] & EPOLLRDHUP) ? more : 0;
}

/* Send to side `to` of the tunnel: through TLS to a TLS client, else plain.
 * Less than len taken means the socket is full: epoll says when it has room. */
static inline ssize_t put(tunnel_t *t, int to, const char *buf, size_t len) {
    ssize_t n = to == CLIENT && t->ssl != NULL
                    ? tls_send(t, buf, len)
                    : send(t->fd[to], buf, len,
                           MSG_NOSIGNAL | MSG_DONTWAIT | last_bytes(t, to, MSG_MORE));
    if (n < (ssize_t)len)
        drained(t, to, EPOLLOUT);
    return n;
}

/* Send the close_notify owed to the client. 1: sent (or OpenSSL gave up on
 * it); 0: wait until the client is writable; -1: the socket failed (errno). */
static int tls_notify(tunnel_t *t) {
    t->profile->tls.clear_error();
    errno = 0;
    int r = t->profile->tls.shutdown(t->ssl);
    int saved = errno;
    int err = r < 0 ? t->profile->tls.get_error(t->ssl, r) : 0;
    if (err == TLS_WANT_WRITE) {
        drained(t, CLIENT, EPOLLOUT);
        return 0;
    }
    t->profile->tls.clear_error();
    t->dir[BACKEND].notify = 0;
    t->notified = 1;
    if (err == TLS_ERROR_SYSCALL && saved != 0) {
        errno = saved; /* a reset, reported as one rather than read back as EOF */
        return -1;
    }
    return 1;
}

/* A graceful end owes a handshaken client its close_notify, once. */
static void owe_notify(tunnel_t *t) {
    if (t->ssl != NULL && t->handshaken && !t->notified && t->fd[CLIENT] >= 0)
        t->dir[BACKEND].notify = 1;
}

/* -- readiness ------------------------------------------------------------ */

/* Each socket is registered once, edge-triggered, and removed before it is
 * closed: four epoll_ctl calls per tunnel instead of six, and none when
 * backpressure turns a direction off and on. The engine remembers what
 * epoll said (ready[]) until a call shows otherwise (EAGAIN, a short read),
 * and what each side waits for (want[]). A side that waits for something it
 * is already known to be ready for goes on the ready queue, which run()
 * serves after the kernel's events: the behaviour of a level-triggered
 * registration, without its system calls. A side that waits for nothing is
 * not served, whatever epoll says (a hang-up is seen at the next read or
 * write, as on Twisted's path). */
static void enqueue(Engine *e, tunnel_t *t) {
    t->queued = 1;
    t->qnext = &e->queue;
    t->qprev = e->queue.qprev;
    e->queue.qprev->qnext = t;
    e->queue.qprev = t;
}

static void dequeue(tunnel_t *t) {
    if (!t->queued)
        return;
    t->qprev->qnext = t->qnext;
    t->qnext->qprev = t->qprev;
    t->queued = 0;
}

/* What side s is ready for among what it waits for (hang-ups and errors always count). */
static inline uint32_t due(const tunnel_t *t, int s) {
    if (t->fd[s] < 0 || t->want[s] == 0)
        return 0;
    return t->ready[s] & (t->want[s] | EPOLLHUP | EPOLLERR);
}

static inline void mark(Engine *e, tunnel_t *t, int s) {
    if (!t->queued && t->state != S_DEAD && due(t, s))
        enqueue(e, t);
}

/* Register a new socket as side `side`, for its whole life. */
static int enroll(Engine *e, tunnel_t *t, int side) {
    struct epoll_event ev = {.events = SOCKET_EVENTS,
                             .data.u64 = (uint64_t)(uintptr_t)t | (uint64_t)side};
    t->want[side] = t->ready[side] = 0;
    return epoll_ctl(e->epfd, EPOLL_CTL_ADD, t->fd[side], &ev);
}

/* Side `side` now waits for `want`. */
static void watch(Engine *e, tunnel_t *t, int side, uint32_t want) {
    t->want[side] = want;
    mark(e, t, side);
}

/* Whether side s of a joined tunnel may be read: its direction holds
 * nothing and saw no EOF. A TLS client is not read while an SSL_write waits
 * to be retried either: a KeyUpdate asking for ours, read then, makes
 * OpenSSL write its answer at once, behind the held record, and fail the
 * connection ("bad length"). The client reads to unblock that write. */
static inline int may_read(const tunnel_t *t, int s) {
    const dir_t *out = &t->dir[s];
    return t->state == S_JOINED && !out->eof && pending(out) == 0 &&
           !(s == CLIENT && t->write_pending);
}

/* What side `s` of a joined tunnel waits for: reading its own direction,
 * writing what the other direction holds for it. */
static void rewatch(Engine *e, tunnel_t *t, int s) {
    uint32_t want = 0;
    dir_t *out = &t->dir[s], *in = &t->dir[1 - s];
    int reading = may_read(t, s);
    /* A closing side that got our FIN is read until it closes (see lingered);
     * not while an SSL_write waits to be retried (see may_read). */
    int lingering = t->state == S_CLOSING && in->shut && !out->eof && pending(in) == 0 &&
                    !(s == CLIENT && t->write_pending);
    if (reading || lingering)
        want |= EPOLLIN;
    /* A TLS read that must write first waits for writability, but only
     * while the client is read at all (else a writable socket would spin). */
    if (pending(in) > 0 || (reading && s == CLIENT && t->read_wants_write))
        want |= EPOLLOUT;
    watch(e, t, s, want);
}

/* Close side `side`. Taken out of epoll first: close() alone leaves the
 * registration while another descriptor shares the socket (a fork()ed child
 * before its exec, a dup), and its next event would name a freed tunnel. */
static void unwatch_close(Engine *e, tunnel_t *t, int side, int abortive) {
    int fd = t->fd[side];
    if (fd < 0)
        return;
    epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, NULL);
    t->want[side] = t->ready[side] = 0;
    if (abortive)
        close_abortively(fd);
    else
        close(fd);
    t->fd[side] = -1;
}

/* -- ending ---------------------------------------------------------------- */

static void count_out(tunnel_t *t);
static void limit_release(struct client_table *ct, const struct sockaddr_storage *ss, double t);

static void end_tunnel(Engine *e, tunnel_t *t) {
    count_out(t);
    if (t->limited) {
        t->limited = 0;
        limit_release(t->profile->clients, &t->peer, now());
    }
    for (int s = 0; s < 2; s++) {
        unwatch_close(e, t, s, 0);
        free(t->dir[s].buf);
        t->dir[s].buf = NULL;
        give_pipe(e, &t->dir[s]);
    }
    t->prev->next = t->next;
    t->next->prev = t->prev;
    dequeue(t);
    e->active--;
    if (e->active < e->max_tunnels)
        e->warned_full = 0;
    unsigned long long *counters = e->slots[t->listener_id].counters;
    counters[C_ACTIVE]--;
    counters[C_BYTES_UP] += t->dir[CLIENT].bytes;
    counters[C_BYTES_DOWN] += t->dir[BACKEND].bytes;
    counters[C_TLS_FAILURES] += t->tls != NULL && !t->handshaken;
    /* A failed handshake is reported even unlogged: Python counts it. */
    if (!e->quiet && (t->profile->log_records || (t->tls != NULL && !t->handshaken))) {
        double end = now();
        PyObject *client = describe(&t->peer, t->peer_len);
        PyObject *backend, *backend_address;
        if (t->connected > 0 && t->backend_index >= 0) {
            backend_t *b = &t->profile->pool->backends[t->backend_index];
            backend = Py_NewRef(PyTuple_GET_ITEM(t->profile->pool->names, t->backend_index));
            backend_address = describe(&b->addr, b->len);
        } else {
            backend = PyUnicode_FromString("");
            backend_address = Py_NewRef(Py_None);
        }
        PyObject *connect_time = t->connected > 0 ? PyFloat_FromDouble(t->connected - t->started)
                                                  : (Py_INCREF(Py_None), Py_None);
        PyObject *tls = t->tls != NULL ? Py_BuildValue("(OO)", t->tls, t->handshaken ? Py_True : Py_False)
                                       : (Py_INCREF(Py_None), Py_None);
        if (!t->noted)
            note(t, PROXY, K_ERROR, "unknown");
        /* In RECORD_FIELDS' order. Allocation failures only lose the record,
         * never the engine. */
        PyObject *record = Py_BuildValue(
            "(iNNNiKKdNiisONO)", t->listener_id, client, backend, backend_address, t->attempts,
            t->dir[CLIENT].bytes, t->dir[BACKEND].bytes, end - t->started, connect_time,
            t->closed_by, t->close_kind, t->reason ? t->reason : "unknown",
            t->spliced ? Py_True : Py_False, tls, (PyObject *)t->profile);
        if (record == NULL || PyList_Append(e->records, record) < 0)
            PyErr_Clear();
        Py_XDECREF(record);
    }
    Py_CLEAR(t->tls); /* the record keeps it, for the access log's TLS fields */
    t->ssl = NULL;
    t->state = S_DEAD;
    t->next = e->graveyard;
    e->graveyard = t;
}

static void bury(Engine *e) {
    if (e->running)
        return; /* run() frees its batch's dead tunnels when the batch is over */
    while (e->graveyard != NULL) {
        tunnel_t *t = e->graveyard;
        e->graveyard = t->next;
        free(t->reason);
        free(t->errors);
        Py_DECREF(t->profile); /* may free it: the last tunnel of a replaced profile */
        free(t);
    }
}

/* What side s has still to take: the bytes held for it, and those its TCP
 * socket has not sent yet (SIOCOUTQNSD: a reset drops them; bytes already
 * sent reach the peer before the RST, acknowledged or not). A UNIX peer
 * reads what was queued even after a close: nothing more to count. */
static size_t owed_to(const tunnel_t *t, int s) {
    const dir_t *d = &t->dir[1 - s];
    int queued = 0;
    if (ioctl(t->fd[s], SIOCOUTQNSD, &queued) < 0 || queued < 0)
        queued = 0;
    return (d->len - d->off) + d->piped + (size_t)queued;
}

/* Side s is about to be reset: what it has not taken never reaches it, so the
 * record stops counting it. A TLS client's send queue holds records, and one
 * cut short is lost whole: one record more is left out, so the count never
 * exceeds what the client could decrypt. */
static void uncount_undelivered(tunnel_t *t, int s) {
    if (t->fd[s] < 0)
        return;
    dir_t *d = &t->dir[1 - s];
    size_t lost = owed_to(t, s);
    if (lost > 0 && s == CLIENT && t->ssl != NULL)
        lost += TLS_RECORD;
    d->bytes -= lost < d->bytes ? lost : d->bytes;
}

static void abort_tunnel(Engine *e, tunnel_t *t) {
    for (int s = 0; s < 2; s++) {
        uncount_undelivered(t, s);
        unwatch_close(e, t, s, 1);
    }
    end_tunnel(e, t);
}

/* Closing starts the close grace (see grace_expired). */
static void start_grace(tunnel_t *t) {
    if (t->grace_at == 0) {
        t->grace_at = now() + t->profile->grace;
        t->owed = UINT32_MAX;
    }
}

/* Read and drop what lingering side s sends. 1 once it has closed (EOF, or
 * an error: nothing more to wait for), 0 while it may send more. */
static int discard(Engine *e, tunnel_t *t, int s) {
    if (!(t->ready[s] & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
        return 0; /* nothing arrived since the last read: epoll will say */
    for (int i = 0; i < 4; i++) {
        ssize_t n = recv(t->fd[s], e->scratch, t->profile->read_size, MSG_DONTWAIT);
        if (n > 0 || (n < 0 && errno == EINTR))
            continue;
        if (n == 0) {
            t->dir[s].eof = 1;
            return 1;
        }
        if (errno != EAGAIN)
            return 1;
        drained(t, s, EPOLLIN);
        return 0;
    }
    return 0; /* more to read: the ready queue brings it back */
}

/* Side s of a closing tunnel has taken all it was owed. 1: it may close now.
 * Closing a socket with unread input makes the kernel send an RST and drop
 * what it had not sent yet, so a side still sending gets our FIN
 * (SHUT_WR) and is read and discarded until it closes too, bounded by the
 * close grace: the lingering close of nginx and HAProxy. */
static int lingered(Engine *e, tunnel_t *t, int s) {
    if (t->dir[s].eof)
        return 1;
    if (!t->dir[1 - s].shut) {
        t->dir[1 - s].shut = 1;
        shutdown(t->fd[s], SHUT_WR);
    }
    return discard(e, t, s);
}

/* Close what is left once nothing is held for it and it has closed too (see
 * lingered); a side still holding bytes for its peer waits (bounded by the
 * close grace). Returns 1 if ended. */
static int maybe_finish(Engine *e, tunnel_t *t) {
    if (t->state != S_CLOSING)
        return 0;
    for (int s = 0; s < 2; s++) {
        if (t->fd[s] >= 0 && pending(&t->dir[1 - s]) == 0 && lingered(e, t, s))
            unwatch_close(e, t, s, 0);
    }
    if (t->fd[CLIENT] < 0 && t->fd[BACKEND] < 0) {
        end_tunnel(e, t);
        return 1;
    }
    for (int s = 0; s < 2; s++)
        if (t->fd[s] >= 0)
            rewatch(e, t, s);
    return 0;
}

/* Graceful close of both sides: stop reading, send what is held, then close. */
static int close_both(Engine *e, tunnel_t *t) {
    owe_notify(t);
    t->state = S_CLOSING;
    start_grace(t);
    return maybe_finish(e, t);
}

/* Side `s` failed (reset or error): close it; the peer is reset too, unless
 * `s` had already sent its FIN (then what it sent is complete: clean close). */
static int side_failed(Engine *e, tunnel_t *t, int s, int err) {
    if (!t->dir[s].eof && t->noted && t->close_kind == K_FIN) {
        /* A side that had not sent its FIN cut the tunnel short: its reset,
         * not the other side's half-close noted before, is what ended it. */
        forget(t);
    }
    note(t, s, K_RST, "%s reset: %s", SIDE_NAMES[s], strerror(err));
    int peer = 1 - s;
    int clean = t->dir[s].eof;
    uncount_undelivered(t, s);
    unwatch_close(e, t, s, 1);
    t->dir[peer].off = t->dir[peer].len = 0; /* nothing more can reach s */
    t->dir[peer].notify = 0;
    give_pipe(e, &t->dir[peer]);
    if (t->fd[peer] >= 0 && !clean) {
        uncount_undelivered(t, peer);
        unwatch_close(e, t, peer, 1);
    }
    t->state = S_CLOSING;
    start_grace(t);
    return maybe_finish(e, t);
}

/* -- the relay ------------------------------------------------------------- */

static int send_eof_if_done(Engine *e, tunnel_t *t, int s);

/* Send what direction s holds to its destination. Returns 1 if the tunnel ended.
 * Bytes sent count as movement for the idle timeout, as bytes read do: a
 * slow reader draining a held read or a full pipe is not idle. */
static int flush(Engine *e, tunnel_t *t, int s) {
    dir_t *d = &t->dir[s];
    int dst = t->fd[1 - s];
    if (dst < 0)
        return 0;
    while (d->len > d->off) {
        ssize_t n = put(t, 1 - s, d->buf + d->off, d->len - d->off);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            return side_failed(e, t, 1 - s, errno);
        }
        d->off += n;
        t->last_moved = now();
    }
    if (d->buf) {
        free(d->buf);
        d->buf = NULL;
        d->off = d->len = 0;
    }
    while (d->piped > 0) {
        ssize_t n = splice(d->pipe_r, NULL, dst, NULL, d->piped,
                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK | last_bytes(t, 1 - s, SPLICE_F_MORE));
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                drained(t, 1 - s, EPOLLOUT);
                return 0;
            }
            return side_failed(e, t, 1 - s, errno);
        }
        if ((size_t)n < d->piped)
            drained(t, 1 - s, EPOLLOUT);
        d->piped -= n;
        t->last_moved = now();
    }
    give_pipe(e, d);
    if (d->notify) {
        int sent = tls_notify(t);
        if (sent == 0)
            return 0;
        if (sent < 0)
            return side_failed(e, t, CLIENT, errno);
    }
    return send_eof_if_done(e, t, s);
}

/* Direction s has sent all it read: pass its EOF on, and close once both are done. */
static int send_eof_if_done(Engine *e, tunnel_t *t, int s) {
    dir_t *d = &t->dir[s];
    if (!d->eof || d->shut || pending(d) > 0)
        return 0;
    if (t->state == S_CLOSING)
        return maybe_finish(e, t);
    if (t->dir[1 - s].eof) {
        /* Both ways done: one close sends the FIN, without a shutdown first. */
        d->shut = 1;
        return close_both(e, t);
    }
    d->shut = 1;
    if (t->fd[1 - s] >= 0)
        shutdown(t->fd[1 - s], SHUT_WR);
    if (t->profile->fin > 0 && t->fin_at == 0)
        t->fin_at = now() + t->profile->fin;
    return 0;
}

static int got_eof(Engine *e, tunnel_t *t, int s) {
    t->dir[s].eof = 1;
    note(t, s, K_FIN, "%s sent FIN", SIDE_NAMES[s]);
    if (!t->profile->half_close)
        return close_both(e, t); /* what was read is sent first, then both close */
    if (s == BACKEND && t->ssl != NULL) {
        owe_notify(t); /* the client hears close_notify, then the FIN */
        if (flush(e, t, s))
            return 1;
        rewatch(e, t, CLIENT);
    } else if (send_eof_if_done(e, t, s)) {
        return 1;
    }
    rewatch(e, t, s);
    return 0;
}

static void start_splicing(tunnel_t *t) {
    if (t->profile->splice_mode > 0 && t->ssl == NULL) /* TLS bytes are rewritten: nothing to splice */
        t->splicing = 1;
}

/* Send the n bytes read into scratch from side s on to its peer; hold what
 * the peer refuses (and stop reading s until it drains). 1 if the tunnel ended. */
static int deliver(Engine *e, tunnel_t *t, int s, size_t n) {
    dir_t *d = &t->dir[s];
    ssize_t sent = put(t, 1 - s, e->scratch, n);
    if (sent < 0) {
        if (errno != EAGAIN && errno != EINTR)
            return side_failed(e, t, 1 - s, errno);
        sent = 0;
    }
    if ((size_t)sent < n) {
        d->buf = malloc(n - sent);
        if (d->buf == NULL) {
            note(t, PROXY, K_ERROR, "out of memory");
            abort_tunnel(e, t);
            return 1;
        }
        memcpy(d->buf, e->scratch + sent, n - sent);
        d->off = 0;
        d->len = n - sent;
        rewatch(e, t, s);
        rewatch(e, t, 1 - s);
    }
    return 0;
}

/* Read what the TLS client sent: whole records, as many as the scratch holds. */
static int tls_relay_read(Engine *e, tunnel_t *t) {
    size_t got = 0;
    int end = 0, err = 0, saved = 0; /* end: 1 EOF (close_notify or a bare FIN), 2 failed */
    t->read_wants_write = 0;
    while (e->scratch_size - got >= TLS_RECORD) {
        t->profile->tls.clear_error();
        errno = 0;
        size_t room = e->scratch_size - got;
        int n = t->profile->tls.read(t->ssl, e->scratch + got, room > (1 << 30) ? (1 << 30) : (int)room);
        if (n > 0) {
            got += n;
            continue;
        }
        saved = errno;
        err = t->profile->tls.get_error(t->ssl, n);
        if (err == TLS_WANT_READ)
            drained(t, CLIENT, EPOLLIN);
        if (err == TLS_WANT_WRITE) { /* a key update to answer: retried once writable */
            t->read_wants_write = 1;
            drained(t, CLIENT, EPOLLOUT);
        } else if (err == TLS_ZERO_RETURN || (err == TLS_ERROR_SYSCALL && saved == 0))
            end = 1;
        else if (err != TLS_WANT_READ)
            end = 2;
        break;
    }
    if (end == 2) {
        char why[256];
        tls_reason(&t->profile->tls, err, saved, why, sizeof why);
        if (err == TLS_ERROR_SSL)
            note(t, CLIENT, K_ERROR, "client TLS error: %s", why);
    }
    /* What was read before an error goes on first, as on the plain path. */
    if (got > 0) {
        t->dir[CLIENT].bytes += got;
        t->last_moved = now();
        if (deliver(e, t, CLIENT, got))
            return 1;
    }
    if (end == 2)
        return side_failed(e, t, CLIENT, saved ? saved : EPROTO);
    if (end == 1)
        return got_eof(e, t, CLIENT);
    if (t->read_wants_write)
        rewatch(e, t, CLIENT);
    return 0;
}

/* Read once from side s and send it on at once; hold what the peer refuses. */
static int relay_read(Engine *e, tunnel_t *t, int s) {
    dir_t *d = &t->dir[s];
    int src = t->fd[s], dst = t->fd[1 - s];
    if (!may_read(t, s) || dst < 0)
        return 0;
    if (s == CLIENT && t->ssl != NULL)
        return tls_relay_read(e, t);
    if (t->splicing && take_pipe(e, d) == 0) {
        ssize_t n = splice(src, NULL, d->pipe_w, NULL, PIPE_CAPACITY,
                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n > 0) {
            d->bytes += n;
            d->piped = n;
            t->spliced = 1;
            t->last_moved = now();
            if (flush(e, t, s))
                return 1;
            rewatch(e, t, s);
            rewatch(e, t, 1 - s);
            return 0;
        }
        give_pipe(e, d);
        /* 0 and EAGAIN are not conclusive: splice stops at TCP urgent data
         * (0 if a FIN follows, else EAGAIN while the socket stays readable),
         * so recv below, which steps over the urgent byte, has the last word. */
        if (n < 0 && errno != EAGAIN && errno != EINTR) {
            if (errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP)
                return side_failed(e, t, s, errno);
            t->splicing = 0; /* this pair of descriptors cannot splice: read as usual */
        }
    }
    ssize_t n = recv(src, e->scratch, t->profile->read_size, 0);
    if (n == 0)
        return got_eof(e, t, s);
    if (n < 0) {
        if (errno == EAGAIN)
            drained(t, s, EPOLLIN);
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        return side_failed(e, t, s, errno);
    }
    /* A short read emptied the socket, unless it stopped at urgent data
     * (EPOLLPRI) or before an EOF (EPOLLRDHUP) that the next read returns. */
    if ((size_t)n < t->profile->read_size && !(t->ready[s] & (EPOLLRDHUP | EPOLLPRI | EPOLLHUP)))
        drained(t, s, EPOLLIN);
    d->bytes += n;
    t->last_moved = now();
    if ((size_t)n >= t->profile->bulk_read)
        start_splicing(t);
    return deliver(e, t, s, n);
}

/* -- balancing --------------------------------------------------------------
 *
 * Each attempt picks among the pool's candidates with its strategy, in a
 * walk or two over the backends and never over the tunnels, by the rules
 * tunnelkit/backends follows on Twisted's plane: the same picks there. */

/* FNV-1a, 64 bits: the source-hash keys of names and client addresses. */
static uint64_t fnv1a64(const void *data, size_t len) {
    const unsigned char *bytes = data;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= bytes[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* splitmix64's finalizer: spreads the bits of a key (and steps random's state). */
static uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* The client's source-hash key: its IP without the port (an IPv4-mapped
 * IPv6 address as the IPv4 one), nothing for a UNIX client. */
static uint64_t client_key(const struct sockaddr_storage *ss) {
    if (ss->ss_family == AF_INET)
        return fnv1a64(&((const struct sockaddr_in *)ss)->sin_addr, 4);
    if (ss->ss_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)ss)->sin6_addr;
        return IN6_IS_ADDR_V4MAPPED(a) ? fnv1a64(a->s6_addr + 12, 4) : fnv1a64(a->s6_addr, 16);
    }
    return fnv1a64(NULL, 0);
}

/* Weighted rendezvous hashing: the backend of the highest score takes the
 * client, so removing one moves only the clients it had. */
static double hash_score(uint64_t client, uint64_t key, int weight) {
    double u = ((double)(mix64(client ^ key) >> 11) + 0.5) * 0x1p-53; /* in (0, 1) */
    return -(double)weight / log(u);
}

static inline int is_set(uint64_t mask, int i) { return (int)((mask >> i) & 1); }

/* The backends this attempt may go to: the available primaries not yet
 * tried, else such backups, else (everything ejected, full or down) the
 * panic set: up, weighted, not full and not tried, ejected or not. */
static uint64_t candidates(const Pool *p, uint64_t tried, double t_now) {
    uint64_t primaries = 0, backups = 0, panic = 0;
    for (int i = 0; i < p->n; i++) {
        const backend_t *b = &p->backends[i];
        if (is_set(tried, i) || !b->up || b->weight == 0 || (p->max_conn > 0 && b->active >= p->max_conn))
            continue;
        panic |= 1ULL << i;
        if (b->ejected_until > t_now)
            continue;
        if (b->backup)
            backups |= 1ULL << i;
        else
            primaries |= 1ULL << i;
    }
    return primaries ? primaries : backups ? backups : panic;
}

/* Whether a carries less load than b for its weight (active / weight). */
static inline int lighter(const backend_t *a, const backend_t *b) {
    return (long long)a->active * b->weight < (long long)b->active * a->weight;
}

/* Smooth weighted round-robin (nginx's): equal weights rotate exactly. */
static int pick_round_robin(Pool *p, uint64_t mask) {
    long long total = 0;
    int best = -1;
    for (int i = 0; i < p->n; i++) {
        if (!is_set(mask, i))
            continue;
        backend_t *b = &p->backends[i];
        b->current += b->weight;
        total += b->weight;
        if (best < 0 || b->current > p->backends[best].current)
            best = i;
    }
    p->backends[best].current -= total;
    return best;
}

/* The least loaded for its weight; ties go to the first from a cursor that
 * moves on at each pick, so equal loads spread. */
static int pick_least_conn(Pool *p, uint64_t mask) {
    int best = -1;
    for (int j = 0; j < p->n; j++) {
        int i = (p->cursor + j) % p->n;
        if (is_set(mask, i) && (best < 0 || lighter(&p->backends[i], &p->backends[best])))
            best = i;
    }
    p->cursor = (p->cursor + 1) % p->n;
    return best;
}

/* One of mask's backends at random, in proportion to its weight. */
static int draw(Pool *p, uint64_t mask) {
    unsigned long long total = 0;
    for (int i = 0; i < p->n; i++)
        if (is_set(mask, i))
            total += p->backends[i].weight;
    p->rng += 0x9e3779b97f4a7c15ULL;
    unsigned long long r = mix64(p->rng) % total;
    int i = 0;
    for (; i < p->n; i++) {
        if (!is_set(mask, i))
            continue;
        if (r < (unsigned long long)p->backends[i].weight)
            break;
        r -= p->backends[i].weight;
    }
    return i;
}

/* Power of two choices: the lighter of two drawn (the first on a tie). */
static int pick_random(Pool *p, uint64_t mask) {
    int first = draw(p, mask);
    uint64_t rest = mask & ~(1ULL << first);
    if (rest == 0)
        return first;
    int second = draw(p, rest);
    return lighter(&p->backends[second], &p->backends[first]) ? second : first;
}

static int pick_source_hash(const Pool *p, uint64_t mask, const struct sockaddr_storage *client) {
    uint64_t key = client_key(client);
    int best = -1;
    double top = 0;
    for (int i = 0; i < p->n; i++) {
        if (!is_set(mask, i))
            continue;
        double score = hash_score(key, p->backends[i].key, p->backends[i].weight);
        if (best < 0 || score > top) {
            best = i;
            top = score;
        }
    }
    return best;
}

/* The backend for tunnel t's next attempt, or -1 if there is none. */
static int pick(Pool *p, const tunnel_t *t, double t_now) {
    uint64_t mask = candidates(p, t->tried, t_now);
    if (mask == 0)
        return -1;
    switch (p->balance) {
    case B_ROUND_ROBIN:
        return pick_round_robin(p, mask);
    case B_LEAST_CONN:
        return pick_least_conn(p, mask);
    case B_RANDOM:
        return pick_random(p, mask);
    case B_SOURCE_HASH:
        return pick_source_hash(p, mask, &t->peer);
    default:
        return __builtin_ctzll(mask);
    }
}

/* Tell the pool's on_change that backend i went down or came back. Queued
 * and called once the engine is between events (announce): the callback
 * may run any Python, close tunnels or call the engine again. */
static void report(Engine *e, Pool *p, int i, int up, const char *fmt, ...) {
    if (p->on_change == NULL || e->quiet)
        return;
    char *reason = NULL;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&reason, fmt, ap) < 0)
        reason = NULL;
    va_end(ap);
    PyObject *change = Py_BuildValue("(OiOs)", p, i, up ? Py_True : Py_False, reason ? reason : "");
    free(reason);
    if (change == NULL || PyList_Append(e->changes, change) < 0)
        PyErr_Clear();
    Py_XDECREF(change);
}

/* Call the on_change of the transitions queued since the last call. */
static void announce(Engine *e) {
    if (PyList_GET_SIZE(e->changes) == 0)
        return;
    PyObject *changes = e->changes, *fresh = PyList_New(0);
    if (fresh == NULL) {
        PyErr_Clear();
        return;
    }
    e->changes = fresh; /* a callback that calls the engine again queues there */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(changes); i++) {
        PyObject *change = PyList_GET_ITEM(changes, i);
        Pool *p = (Pool *)PyTuple_GET_ITEM(change, 0);
        if (p->on_change == NULL)
            continue;
        PyObject *callback = Py_NewRef(p->on_change);
        PyObject *r = PyObject_CallFunctionObjArgs(callback, PyTuple_GET_ITEM(change, 1),
                                                   PyTuple_GET_ITEM(change, 2),
                                                   PyTuple_GET_ITEM(change, 3), NULL);
        if (r == NULL)
            PyErr_WriteUnraisable(callback);
        Py_XDECREF(r);
        Py_DECREF(callback);
    }
    Py_DECREF(changes);
}

/* Tunnel t stops counting in its backend's active: its attempt failed or it ended. */
static void count_out(tunnel_t *t) {
    if (!t->counted)
        return;
    t->counted = 0;
    t->profile->pool->backends[t->backend_index].active--;
}

/* An attempt to backend i failed (passive ejection): enough failures in a
 * row eject it for a backoff that doubles with each ejection; a backend on
 * probation (its backoff over, not connected since) is ejected again at
 * its first failure. Only the first ejection is reported: it stays down. */
static void backend_failed(Engine *e, Pool *p, int i, const char *why) {
    backend_t *b = &p->backends[i];
    double t_now = now();
    b->failed++;
    if (b->failures < INT_MAX)
        b->failures++;
    if (p->eject_after == 0 || b->failures < p->eject_after || b->ejected_until > t_now)
        return;
    double backoff = fmin(ldexp(p->eject_base, b->ejections < 1024 ? b->ejections : 1024), p->eject_max);
    b->ejected_until = t_now + backoff;
    if (b->ejections++ == 0)
        report(e, p, i, 0, "%d connect failures in a row: %s; next try in %g s", b->failures, why,
               backoff);
}

/* Backend i connected: its failures are forgiven, and an ejected one is back. */
static void backend_joined(Engine *e, Pool *p, int i) {
    backend_t *b = &p->backends[i];
    b->connections++;
    b->failures = 0;
    if (b->ejections > 0) {
        b->ejections = 0;
        b->ejected_until = 0;
        report(e, p, i, 1, "connected again");
    }
}

/* -- the PROXY protocol ---------------------------------------------------------
 *
 * --proxy-protocol v1|v2: the backend gets a header with the client's address
 * and the one it connected to before any byte of the client's, as HAProxy's
 * send-proxy(-v2) writes it; tunnelkit/proxy_protocol/build.py makes the same
 * bytes on Twisted's plane (tests hold the two planes to the same header).
 * The header is put where the client's held bytes go (dir[CLIENT].buf), so
 * flush() sends it first and the client is not read until it is sent. */

static const char V2_SIGNATURE[12] = {'\r', '\n', '\r', '\n', 0, '\r', '\n', 'Q', 'U', 'I', 'T', '\n'};
#define V2_HEADER 16     /* the signature, command, family and length */
#define V2_ADDRESSES 36  /* two IPv6 addresses and two ports, the most version 2 carries here */

/* The client's address and the one it connected to, each as (IP bytes, port)
 * in network order. 4 or 16: their size; 0: they cannot be said (a UNIX
 * socket), and the header says UNKNOWN (v1) or LOCAL (v2). */
static int proxy_addresses(const tunnel_t *t, unsigned char ips[2][16], uint16_t ports[2]) {
    struct sockaddr_storage local;
    socklen_t len = sizeof local;
    const struct sockaddr_storage *ends[2] = {&t->peer, &local};
    if (getsockname(t->fd[CLIENT], (struct sockaddr *)&local, &len) < 0 ||
        local.ss_family != t->peer.ss_family)
        return 0;
    for (int i = 0; i < 2; i++) {
        if (ends[i]->ss_family == AF_INET) {
            const struct sockaddr_in *a = (const struct sockaddr_in *)ends[i];
            memcpy(ips[i], &a->sin_addr, 4);
            ports[i] = a->sin_port;
        } else if (ends[i]->ss_family == AF_INET6) {
            const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ends[i];
            memcpy(ips[i], &a->sin6_addr, 16);
            ports[i] = a->sin6_port;
        } else {
            return 0;
        }
    }
    return local.ss_family == AF_INET ? 4 : 16;
}

/* The longest version 1 line (proxy-protocol.txt 2.1), CRLF and a NUL. */
#define V1_ROOM 108

/* The version 1 line into out (V1_ROOM bytes): its length. */
static size_t proxy_v1(char *out, int size, unsigned char ips[2][16], const uint16_t ports[2]) {
    if (size == 0)
        return (size_t)snprintf(out, V1_ROOM, "PROXY UNKNOWN\r\n");
    char text[2][INET6_ADDRSTRLEN];
    int family = size == 4 ? AF_INET : AF_INET6;
    for (int i = 0; i < 2; i++)
        inet_ntop(family, ips[i], text[i], sizeof text[i]);
    return (size_t)snprintf(out, V1_ROOM, "PROXY TCP%c %s %s %u %u\r\n", size == 4 ? '4' : '6', text[0], text[1],
                           ntohs(ports[0]), ntohs(ports[1]));
}

/* A TLS client's version 2 TLVs, asked of Python (NULL with a Python error). */
static PyObject *proxy_tlvs(const tunnel_t *t) {
    PyObject *tlvs = PyObject_CallOneArg(t->profile->proxy_tlvs, t->tls);
    if (tlvs != NULL && !PyBytes_Check(tlvs)) {
        Py_DECREF(tlvs);
        PyErr_SetString(PyExc_TypeError, "proxy_tlvs must return bytes");
        return NULL;
    }
    if (tlvs != NULL && PyBytes_GET_SIZE(tlvs) > 0xFFFF - V2_ADDRESSES) {
        Py_DECREF(tlvs);
        PyErr_SetString(PyExc_ValueError, "the PROXY header's TLVs are too long");
        return NULL;
    }
    return tlvs;
}

/* The version 2 header into a new buffer: its length, or 0 (Python error, out of memory). */
static size_t proxy_v2(const tunnel_t *t, char **out, int size, unsigned char ips[2][16],
                       const uint16_t ports[2]) {
    PyObject *tlvs = NULL;
    if (size > 0 && t->tls != NULL && t->profile->proxy_tlvs != NULL &&
        (tlvs = proxy_tlvs(t)) == NULL)
        return 0;
    size_t extra = tlvs != NULL ? (size_t)PyBytes_GET_SIZE(tlvs) : 0;
    size_t body = size > 0 ? 2 * (size_t)size + 4 + extra : 0;
    unsigned char *h = malloc(V2_HEADER + body);
    if (h != NULL) {
        memcpy(h, V2_SIGNATURE, 12);
        h[12] = size > 0 ? 0x21 : 0x20; /* version 2, PROXY or LOCAL */
        h[13] = size == 4 ? 0x11 : size == 16 ? 0x21 : 0x00; /* TCP4, TCP6 or UNSPEC */
        h[14] = (unsigned char)(body >> 8);
        h[15] = (unsigned char)body;
        if (size > 0) {
            memcpy(h + V2_HEADER, ips[0], size);
            memcpy(h + V2_HEADER + size, ips[1], size);
            memcpy(h + V2_HEADER + 2 * size, &ports[0], 2);
            memcpy(h + V2_HEADER + 2 * size + 2, &ports[1], 2);
            if (extra > 0)
                memcpy(h + V2_HEADER + 2 * size + 4, PyBytes_AS_STRING(tlvs), extra);
        }
    }
    Py_XDECREF(tlvs);
    *out = (char *)h;
    return h != NULL ? V2_HEADER + body : 0;
}

/* Put the tunnel's PROXY header first in what goes to its backend. -1: it
 * could not be made (said in the record's reason). */
static int proxy_header(tunnel_t *t) {
    unsigned char ips[2][16];
    uint16_t ports[2];
    int size = proxy_addresses(t, ips, ports);
    dir_t *d = &t->dir[CLIENT];
    size_t len;
    if (t->profile->proxy_protocol == 1) {
        d->buf = malloc(V1_ROOM);
        len = d->buf != NULL ? proxy_v1(d->buf, size, ips, ports) : 0;
    } else {
        len = proxy_v2(t, &d->buf, size, ips, ports);
    }
    if (len == 0) {
        if (PyErr_Occurred())
            PyErr_WriteUnraisable(t->profile->proxy_tlvs);
        note(t, PROXY, K_ERROR, "the PROXY header could not be made");
        return -1;
    }
    d->off = 0;
    d->len = len;
    return 0;
}

/* -- connecting ------------------------------------------------------------ */

static int try_backends(Engine *e, tunnel_t *t);
static void turn_away(Engine *e, tunnel_t *t);
static void out_of_fds(Engine *e, int err);

/* The backend is connected: relay. 1 if the tunnel ended instead. */
static int join(Engine *e, tunnel_t *t) {
    t->state = S_JOINED;
    t->connected = now();
    t->last_moved = t->connected;
    backend_joined(e, t->profile->pool, t->backend_index);
    if (t->profile->proxy_protocol && proxy_header(t) < 0) {
        abort_tunnel(e, t);
        return 1;
    }
    if (t->profile->splice_mode == 2)
        start_splicing(t);
    rewatch(e, t, BACKEND);
    /* What the client sent meanwhile (even a FIN) waits in the kernel, in order. */
    rewatch(e, t, CLIENT);
    return 0;
}

/* The attempt failed: said in the record's reason, and held against the
 * backend unless the failure was ours (`blame` 0: no descriptor here). */
static void attempt_failed(Engine *e, tunnel_t *t, const char *why, int timed_out, int blame) {
    Pool *p = t->profile->pool;
    t->last_timed_out = timed_out;
    const char *name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(p->names, t->backend_index));
    if (name == NULL)
        PyErr_Clear();
    char *errors;
    if (asprintf(&errors, "%s%s%s: %s", t->errors ? t->errors : "", t->errors ? "; " : "",
                 name ? name : "?", why) >= 0) {
        free(t->errors);
        t->errors = errors;
    }
    unwatch_close(e, t, BACKEND, 0);
    count_out(t);
    if (blame)
        backend_failed(e, p, t->backend_index, why);
    t->backend_index = -1;
}

/* Start the next backend attempt, within the pool's retries; when none is
 * left, close the client and end. */
static int try_backends(Engine *e, tunnel_t *t) {
    Pool *p = t->profile->pool;
    int most = p->retries < 0 ? p->n : 1 + p->retries;
    for (;;) {
        double t_now = now();
        int i = t->attempts < most ? pick(p, t, t_now) : -1;
        if (i < 0)
            break;
        backend_t *b = &p->backends[i];
        t->tried |= 1ULL << i;
        t->attempts++;
        t->backend_index = i;
        t->counted = 1;
        b->active++;
        int fd = socket(b->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0 && (errno == EMFILE || errno == ENFILE) && e->n_pipes > 0) {
            shrink_pool(e, 1); /* as at accept: pipes go first */
            fd = socket(b->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        }
        t->fd[BACKEND] = fd;
        if (fd < 0) {
            int err = errno;
            /* Out of descriptors here rather than at accept (which of the two
             * runs out first is chance): said once per burst all the same. */
            if (err == EMFILE || err == ENFILE)
                out_of_fds(e, EMFILE);
            attempt_failed(e, t, strerror(err), 0, 0);
            continue;
        }
        e->warned_fds = 0; /* a tunnel got its descriptors: the burst is over */
        set_options(t->profile, fd, b->addr.ss_family);
        t->deadline = t_now + t->profile->connect_timeout;
        /* Registered once connect() has started: epoll calls an unconnected
         * TCP socket hung up. */
        int r = connect(fd, (struct sockaddr *)&b->addr, b->len);
        int err = r == 0 || errno == EINPROGRESS || errno == EINTR ? 0 : errno;
        if (err == 0 && enroll(e, t, BACKEND) < 0)
            err = errno;
        if (err == 0 && r == 0)
            return join(e, t);
        if (err == 0) {
            watch(e, t, BACKEND, EPOLLOUT);
            return 0;
        }
        attempt_failed(e, t, strerror(err), 0, 1);
    }
    e->slots[t->listener_id].counters[C_CONNECT_FAILURES]++;
    if (t->attempts == 0)
        note(t, PROXY, K_ERROR, "no backend available");
    else
        note(t, PROXY, t->last_timed_out ? K_TIMEOUT : K_ERROR, "no backend connected: %s",
             t->errors ? t->errors : "no attempt made");
    turn_away(e, t);
    return 1;
}

/* The connect finished: writable alone means it succeeded; an error or a
 * hang-up is read back with SO_ERROR (one system call saved per tunnel). */
static int backend_connected(Engine *e, tunnel_t *t, uint32_t ev) {
    int err = 0;
    socklen_t len = sizeof err;
    if ((ev & (EPOLLERR | EPOLLHUP)) &&
        getsockopt(t->fd[BACKEND], SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if ((ev & (EPOLLERR | EPOLLHUP)) && err == 0)
        err = ECONNRESET; /* hung up without saying why */
    if (err == 0)
        return join(e, t);
    attempt_failed(e, t, strerror(err), 0, 1);
    return try_backends(e, t);
}

/* The client while its backend connects: its bytes wait in the kernel; a reset
 * cancels the attempt, also after a FIN; a FIN is kept for after the join. */
static int client_while_connecting(Engine *e, tunnel_t *t, uint32_t ev) {
    if (ev & (EPOLLERR | EPOLLHUP)) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(t->fd[CLIENT], SOL_SOCKET, SO_ERROR, &err, &len);
        if (err)
            note(t, CLIENT, K_RST, "client reset: %s", strerror(err));
        note(t, CLIENT, K_FIN, "client left before the backend connected");
        abort_tunnel(e, t);
        return 1;
    }
    /* Its FIN stays queued behind its bytes for the join; from then on only
     * a reset (EPOLLHUP, EPOLLERR) is news: waiting for EPOLLRDHUP, which
     * stays ready, would serve it again and again. */
    if (ev & EPOLLRDHUP)
        watch(e, t, CLIENT, EPOLLHUP | EPOLLERR);
    return 0;
}

/* -- the TLS handshake ------------------------------------------------------- */

/* Close a client that will get no tunnel: what it sent is read and dropped
 * first, as closing with unread bytes would send an RST instead of a FIN. */
static void turn_away(Engine *e, tunnel_t *t) {
    for (int i = 0; i < 4 && recv(t->fd[CLIENT], e->scratch, t->profile->read_size, MSG_DONTWAIT) > 0; i++)
        ;
    unwatch_close(e, t, CLIENT, 0);
    end_tunnel(e, t);
}

/* Go on with the handshake; once done, dial the backends. 1 if the tunnel ended. */
static int tls_handshake(Engine *e, tunnel_t *t) {
    t->profile->tls.clear_error();
    errno = 0;
    int r = t->profile->tls.do_handshake(t->ssl); /* may call Python: SNI, ALPN */
    if (PyErr_Occurred())
        PyErr_WriteUnraisable(t->profile->tls_new);
    if (r == 1) {
        t->handshaken = 1;
        t->state = S_CONNECTING;
        watch(e, t, CLIENT, EPOLLRDHUP);
        return try_backends(e, t);
    }
    int saved = errno;
    int err = t->profile->tls.get_error(t->ssl, r);
    if (err == TLS_WANT_READ || err == TLS_WANT_WRITE) {
        uint32_t what = err == TLS_WANT_READ ? EPOLLIN : EPOLLOUT;
        drained(t, CLIENT, what);
        watch(e, t, CLIENT, what);
        return 0;
    }
    char why[256];
    tls_reason(&t->profile->tls, err, saved, why, sizeof why);
    note(t, CLIENT, K_ERROR, "TLS handshake failed: %s", why);
    turn_away(e, t);
    return 1;
}

/* A TLS listener's client: Python makes its OpenSSL connection, then the
 * handshake waits for the ClientHello. */
static void tls_start(Engine *e, tunnel_t *t) {
    unsigned long long address = 0;
    PyObject *connection = NULL;
    PyObject *made = PyObject_CallFunction(t->profile->tls_new, "i", t->fd[CLIENT]);
    if (made != NULL && PyArg_ParseTuple(made, "KO", &address, &connection) && address != 0) {
        t->ssl = (void *)(uintptr_t)address;
        t->tls = Py_NewRef(connection);
        Py_DECREF(made);
        t->state = S_HANDSHAKE;
        t->deadline = now() + t->profile->tls_timeout;
        watch(e, t, CLIENT, EPOLLIN);
        return;
    }
    if (PyErr_Occurred())
        PyErr_WriteUnraisable(t->profile->tls_new);
    Py_XDECREF(made);
    note(t, PROXY, K_ERROR, "TLS setup failed");
    unwatch_close(e, t, CLIENT, 1);
    end_tunnel(e, t);
}

/* -- per-client limits -----------------------------------------------------------
 *
 * --max-conn-per-client and --rate-per-client with --rate-burst, by the
 * rules of tunnelkit/policy/client_limits.py (which documents them): a
 * client is its IP address (IPv4-mapped IPv6 as IPv4, no /64 grouping), a
 * connection the bucket lets through takes a token, live tunnels are
 * counted until their end. A ClientTable is a listener's, shared by the
 * profiles made for it (so by their tunnels), and looked up per accept in
 * a hash table keyed with a random seed; no Python runs per connection.
 * Memory stays bounded: an idle client (no live tunnel) whose bucket is full
 * again is forgotten, and beyond `tracked` idle clients the least recently
 * seen are forgotten first; clients with live tunnels are at most the
 * engine's max_tunnels. */

enum { LIMIT_UNTRACKED = -1, LIMIT_OK = 0, LIMIT_CONNECTIONS, LIMIT_RATE };
static const char *LIMIT_NAMES[] = {"", "connections", "rate"};

typedef struct client {
    struct client *chain;       /* the next client in its hash bucket */
    struct client *prev, *next; /* in the idle list (oldest first), while idle */
    unsigned char addr[16];     /* IPv6, or IPv4-mapped */
    long active;                /* live tunnels */
    double tokens, stamp;       /* the bucket, as of stamp */
    double logged_at;           /* the last client_limited line about it (-1: none) */
    unsigned long refused;      /* refusals since that line */
} client_t;

typedef struct client_table {
    PyObject_HEAD
    long max_conn;  /* 0: no concurrency limit */
    double rate;    /* tokens per second; 0: no rate limit */
    long burst;
    long tracked;   /* idle clients kept at most */
    double log_interval;
    uint64_t seed;
    size_t mask;    /* buckets - 1 */
    client_t **buckets;
    client_t idle;  /* circular list head: idle.next is the oldest idle client */
    long n;         /* clients remembered */
    long n_idle;
} ClientTable;

/* The client's address as 16 bytes; 0 for a peer that is not limited (UNIX). */
static int limit_key(const struct sockaddr_storage *ss, unsigned char out[16]) {
    if (ss->ss_family == AF_INET) {
        static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        memcpy(out, mapped, 12);
        memcpy(out + 12, &((const struct sockaddr_in *)ss)->sin_addr, 4);
        return 1;
    }
    if (ss->ss_family == AF_INET6) {
        memcpy(out, &((const struct sockaddr_in6 *)ss)->sin6_addr, 16);
        return 1;
    }
    return 0;
}

/* Keyed by the table's random seed: chosen source addresses cannot pile
 * into one bucket without knowing it. */
static client_t **limit_bucket(ClientTable *ct, const unsigned char addr[16]) {
    uint64_t hi, lo;
    memcpy(&hi, addr, 8);
    memcpy(&lo, addr + 8, 8);
    return &ct->buckets[mix64(mix64(ct->seed ^ hi) ^ lo) & ct->mask];
}

/* Where the client of addr is linked in its bucket (*link is NULL if it is not there). */
static client_t **limit_find(ClientTable *ct, const unsigned char addr[16]) {
    client_t **link = limit_bucket(ct, addr);
    while (*link != NULL && memcmp((*link)->addr, addr, 16) != 0)
        link = &(*link)->chain;
    return link;
}

static void idle_unlink(ClientTable *ct, client_t *c) {
    c->prev->next = c->next;
    c->next->prev = c->prev;
    c->prev = c->next = NULL;
    ct->n_idle--;
}

/* Forgetting an idle client changes nothing once its bucket is full again. */
static int limit_as_new(const ClientTable *ct, const client_t *c, double t) {
    return ct->rate <= 0 || c->tokens + (t - c->stamp) * ct->rate >= (double)ct->burst;
}

/* An idle client goes last in line to be forgotten; the first in line go
 * while they are as good as new or too many. */
static void limit_settle(ClientTable *ct, client_t *c, double t) {
    if (c->active > 0)
        return;
    c->prev = ct->idle.prev;
    c->next = &ct->idle;
    ct->idle.prev->next = c;
    ct->idle.prev = c;
    ct->n_idle++;
    while (ct->n_idle > 0) {
        client_t *oldest = ct->idle.next;
        if (ct->n_idle <= ct->tracked && !limit_as_new(ct, oldest, t))
            break;
        idle_unlink(ct, oldest);
        client_t **link = limit_find(ct, oldest->addr);
        *link = oldest->chain;
        free(oldest);
        ct->n--;
    }
}

/* Take a slot for a new tunnel of this client, or say why not. *log is set
 * to the refusals to report when a client_limited line is due (else 0). A
 * client the table has no memory for is let in untracked. */
static int limit_admit(ClientTable *ct, const struct sockaddr_storage *ss, double t,
                       unsigned long *log) {
    unsigned char addr[16];
    *log = 0;
    if (!limit_key(ss, addr))
        return LIMIT_UNTRACKED;
    client_t **link = limit_find(ct, addr);
    client_t *c = *link;
    if (c == NULL) {
        c = calloc(1, sizeof *c);
        if (c == NULL)
            return LIMIT_UNTRACKED;
        memcpy(c->addr, addr, 16);
        c->tokens = (double)ct->burst;
        c->stamp = t;
        c->logged_at = -1;
        *link = c;
        ct->n++;
    } else if (c->prev != NULL) {
        idle_unlink(ct, c);
    }
    int why = LIMIT_OK;
    if (ct->rate > 0) {
        c->tokens += (t - c->stamp) * ct->rate;
        if (c->tokens > (double)ct->burst)
            c->tokens = (double)ct->burst;
        c->stamp = t;
        if (c->tokens < 1)
            why = LIMIT_RATE;
        else
            c->tokens -= 1;
    }
    if (why == LIMIT_OK && ct->max_conn > 0 && c->active >= ct->max_conn)
        why = LIMIT_CONNECTIONS;
    if (why == LIMIT_OK) {
        c->active++;
    } else {
        c->refused++;
        if (c->logged_at < 0 || t - c->logged_at >= ct->log_interval) {
            *log = c->refused;
            c->logged_at = t;
            c->refused = 0;
        }
    }
    limit_settle(ct, c, t);
    return why;
}

/* A tunnel counted by limit_admit ended (at time t). */
static void limit_release(ClientTable *ct, const struct sockaddr_storage *ss, double t) {
    unsigned char addr[16];
    if (!limit_key(ss, addr))
        return;
    client_t *c = *limit_find(ct, addr);
    if (c == NULL || c->active <= 0)
        return;
    c->active--;
    limit_settle(ct, c, t);
}

/* A packed IPv4 or IPv6 address (4 or 16 bytes) as a peer, for admit() and release(). */
static int packed_peer(PyObject *packed, struct sockaddr_storage *ss) {
    char *bytes;
    Py_ssize_t size;
    if (PyBytes_AsStringAndSize(packed, &bytes, &size) < 0)
        return -1;
    memset(ss, 0, sizeof *ss);
    if (size == 4) {
        ss->ss_family = AF_INET;
        memcpy(&((struct sockaddr_in *)ss)->sin_addr, bytes, 4);
    } else if (size == 16) {
        ss->ss_family = AF_INET6;
        memcpy(&((struct sockaddr_in6 *)ss)->sin6_addr, bytes, 16);
    } else {
        PyErr_SetString(PyExc_ValueError, "a packed address is 4 or 16 bytes");
        return -1;
    }
    return 0;
}

/* The table's rules without a socket, on the caller's clock: the test that
 * holds them to tunnelkit/policy/client_limits.py's runs both on one script. */
static PyObject *ClientTable_admit(ClientTable *ct, PyObject *args) {
    PyObject *packed;
    double t;
    unsigned long log;
    struct sockaddr_storage ss;
    if (!PyArg_ParseTuple(args, "Sd", &packed, &t) || packed_peer(packed, &ss) < 0)
        return NULL;
    int why = limit_admit(ct, &ss, t, &log);
    return why <= LIMIT_OK ? Py_BuildValue("(Ok)", Py_None, log)
                           : Py_BuildValue("(sk)", LIMIT_NAMES[why], log);
}

static PyObject *ClientTable_release(ClientTable *ct, PyObject *args) {
    PyObject *packed;
    double t;
    struct sockaddr_storage ss;
    if (!PyArg_ParseTuple(args, "Sd", &packed, &t) || packed_peer(packed, &ss) < 0)
        return NULL;
    limit_release(ct, &ss, t);
    Py_RETURN_NONE;
}

static PyObject *ClientTable_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"max_conn", "rate", "burst", "tracked", "log_interval", NULL};
    long max_conn = 0, burst = 0, tracked = 16384;
    double rate = 0, log_interval = 10.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$ldlld", kwlist, &max_conn, &rate, &burst,
                                     &tracked, &log_interval))
        return NULL;
    const char *why = max_conn < 0 ? "max_conn must be 0 (no limit) or positive"
                      : !(rate >= 0) || !isfinite(rate) ? "rate must be 0 (no limit) or positive"
                      : rate > 0 && burst < 1 ? "burst must be at least 1 with a rate"
                      : tracked < 1 ? "tracked must be positive"
                      : !(log_interval >= 0) ? "log_interval must be 0 or positive"
                      : NULL;
    if (why != NULL) {
        PyErr_SetString(PyExc_ValueError, why);
        return NULL;
    }
    ClientTable *ct = (ClientTable *)type->tp_alloc(type, 0);
    if (ct == NULL)
        return NULL;
    size_t buckets = 64;
    while (buckets < (size_t)tracked && buckets < ((size_t)1 << 20))
        buckets <<= 1;
    ct->buckets = calloc(buckets, sizeof *ct->buckets);
    if (ct->buckets == NULL) {
        Py_DECREF(ct);
        return PyErr_NoMemory();
    }
    ct->mask = buckets - 1;
    ct->max_conn = max_conn;
    ct->rate = rate;
    ct->burst = burst;
    ct->tracked = tracked;
    ct->log_interval = log_interval;
    ct->idle.prev = ct->idle.next = &ct->idle;
    if (getrandom(&ct->seed, sizeof ct->seed, GRND_NONBLOCK) != sizeof ct->seed)
        ct->seed = mix64((uint64_t)(uintptr_t)ct ^ (uint64_t)(now() * 1e9));
    return (PyObject *)ct;
}

static void ClientTable_dealloc(ClientTable *ct) {
    for (size_t i = 0; ct->buckets != NULL && i <= ct->mask; i++) {
        client_t *c = ct->buckets[i];
        while (c != NULL) {
            client_t *chain = c->chain;
            free(c);
            c = chain;
        }
    }
    free(ct->buckets);
    Py_TYPE(ct)->tp_free((PyObject *)ct);
}

static Py_ssize_t ClientTable_len(ClientTable *ct) { return ct->n; }

static PyObject *ClientTable_get_limits(ClientTable *ct, void *Py_UNUSED(closure)) {
    return Py_BuildValue("(ldl)", ct->max_conn, ct->rate, ct->burst);
}

static PySequenceMethods ClientTable_sequence = {.sq_length = (lenfunc)ClientTable_len};

static PyMethodDef ClientTable_methods[] = {
    {"admit", (PyCFunction)ClientTable_admit, METH_VARARGS,
     "admit(packed address, now): (None or 'connections' or 'rate', refusals to log now or 0), as an accept at time now."},
    {"release", (PyCFunction)ClientTable_release, METH_VARARGS,
     "release(packed address, now): a tunnel admitted for that address ended at time now."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ClientTable_getset[] = {
    {"limits", (getter)ClientTable_get_limits, NULL, "(max_conn, rate, burst).", NULL},
    {NULL},
};

static PyTypeObject ClientTableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tunnelkit.engine._engine.ClientTable",
    .tp_basicsize = sizeof(ClientTable),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A listener's per-client limits and the clients it remembers (len: how many).",
    .tp_new = ClientTable_new,
    .tp_dealloc = (destructor)ClientTable_dealloc,
    .tp_as_sequence = &ClientTable_sequence,
    .tp_methods = ClientTable_methods,
    .tp_getset = ClientTable_getset,
};

/* -- accepting -------------------------------------------------------------- */

/* Queue a notice for Python; allocation failures only lose the notice. */
static void notice(Engine *e, PyObject *item) {
    if (item == NULL || PyList_Append(e->notices, item) < 0)
        PyErr_Clear();
    Py_XDECREF(item);
}

/* Tell Python the process is out of descriptors, once per burst (as for the cap). */
static void out_of_fds(Engine *e, int err) {
    if (!e->warned_fds) {
        e->warned_fds = 1;
        notice(e, Py_BuildValue("(si)", "accept_failed", err));
    }
}

/* Whether profile p's client policy lets this client in (UNIX peers pass:
 * file modes guard them). The policy may run any Python: the caller holds
 * its own reference to p. */
static int client_allowed(Profile *p, int id, const struct sockaddr_storage *ss) {
    if (p->client_check == NULL || (ss->ss_family != AF_INET && ss->ss_family != AF_INET6))
        return 1;
    char host[INET6_ADDRSTRLEN];
    int port;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        port = ntohs(a->sin_port);
    } else {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        port = ntohs(a->sin6_port);
    }
    PyObject *ok = PyObject_CallFunction(p->client_check, "sii", host, port, id);
    int allowed = ok == NULL ? -1 : PyObject_IsTrue(ok);
    Py_XDECREF(ok);
    /* A policy that fails refuses: logged, and the engine goes on. */
    if (allowed < 0)
        PyErr_WriteUnraisable(p->client_check);
    return allowed == 1;
}

/* The profile's per-client limits: LIMIT_OK (counted: release it),
 * LIMIT_UNTRACKED (let in uncounted), or refused: counted, and said in a
 * client_limited notice at most once per client per log interval. */
static int client_limited(Engine *e, Profile *p, int id, const struct sockaddr_storage *ss,
                          socklen_t len, double t) {
    if (p->clients == NULL)
        return LIMIT_UNTRACKED;
    unsigned long log;
    int why = limit_admit(p->clients, ss, t, &log);
    if (why <= LIMIT_OK)
        return why;
    e->slots[id].counters[why == LIMIT_RATE ? C_REFUSED_CLIENT_RATE : C_REFUSED_CLIENT_CONNECTIONS]++;
    if (log > 0)
        notice(e, Py_BuildValue("(siNsOk)", "client_limited", id, describe(ss, len),
                                LIMIT_NAMES[why], (PyObject *)p->clients, log));
    return why;
}

/* The client policy first, then the per-client limits, then the cap, as on
 * Twisted's path (a refused client is logged as such even when the proxy is
 * full). The new tunnel keeps the listener's profile of this moment. */
static void admit(Engine *e, listener_t *l, int fd, struct sockaddr_storage *ss, socklen_t len) {
    slot_t *slot = &e->slots[l->id];
    Profile *p = slot->profile;
    if (p == NULL) { /* the engine was closed by the client policy */
        close(fd);
        return;
    }
    Py_INCREF(p);
    if (!client_allowed(p, l->id, ss)) {
        slot->counters[C_REFUSED_CLIENT_POLICY]++;
        Py_DECREF(p);
        close(fd);
        return;
    }
    double started = now();
    int limited = client_limited(e, p, l->id, ss, len, started);
    if (limited > LIMIT_OK) {
        Py_DECREF(p);
        close(fd);
        return;
    }
    tunnel_t *t = e->active < e->max_tunnels ? calloc(1, sizeof *t) : NULL;
    if (t == NULL) {
        if (e->active >= e->max_tunnels) {
            if (!e->warned_full) {
                e->warned_full = 1;
                notice(e, Py_BuildValue("(sl)", "connection_limit", e->max_tunnels));
            }
            slot->counters[C_REFUSED_CONNECTION_LIMIT]++;
        }
        if (limited == LIMIT_OK)
            limit_release(p->clients, ss, started);
        Py_DECREF(p);
        close(fd);
        return;
    }
    t->limited = limited == LIMIT_OK;
    e->active++;
    slot->counters[C_ACCEPTED]++;
    slot->counters[C_ACTIVE]++;
    room_for_tunnel(e);
    t->profile = p;
    t->fd[CLIENT] = fd;
    t->fd[BACKEND] = -1;
    for (int s = 0; s < 2; s++)
        t->dir[s].pipe_r = t->dir[s].pipe_w = -1;
    t->listener_id = l->id;
    t->backend_index = -1;
    t->started = started;
    t->last_moved = t->started;
    memcpy(&t->peer, ss, len);
    t->peer_len = len;
    t->next = &e->head;
    t->prev = e->head.prev;
    e->head.prev->next = t;
    e->head.prev = t;
    if (enroll(e, t, CLIENT) < 0) {
        note(t, PROXY, K_ERROR, "epoll: %s", strerror(errno));
        abort_tunnel(e, t);
        return;
    }
    if (p->tls_new != NULL) {
        tls_start(e, t);
        return;
    }
    watch(e, t, CLIENT, EPOLLRDHUP);
    try_backends(e, t);
}

static void accept_clients(Engine *e, listener_t *l) {
    /* l->fd < 0: a client policy removed the listener meanwhile. */
    for (int i = 0; i < ACCEPTS_PER_EVENT && l->fd >= 0; i++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int fd = accept4(l->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if ((errno == EMFILE || errno == ENFILE) && e->n_pipes > 0) {
                shrink_pool(e, 1); /* the descriptors beyond the budget ran out: pipes go first */
                continue;
            }
            if ((errno == EMFILE || errno == ENFILE) && e->reserve_fd >= 0) {
                /* Accept with the reserved descriptor and close at once: the
                 * client is told, and the listener does not spin. */
                close(e->reserve_fd);
                fd = accept(l->fd, NULL, NULL);
                if (fd >= 0) {
                    close(fd);
                    e->slots[l->id].counters[C_REFUSED_OUT_OF_FDS]++;
                }
                e->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                out_of_fds(e, EMFILE);
            }
            return;
        }
        if (len == 0)
            ss.ss_family = AF_UNIX;
        admit(e, l, fd, &ss, len);
    }
}

/* -- dispatch ---------------------------------------------------------------- */

static int read_error(int fd) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    return err ? err : ECONNRESET;
}

static void on_event(Engine *e, tunnel_t *t, int s, uint32_t ev) {
    if (t->state == S_DEAD || t->fd[s] < 0)
        return;
    if (t->state == S_HANDSHAKE) {
        tls_handshake(e, t);
        return;
    }
    if (t->state == S_CONNECTING) {
        if (s == BACKEND)
            backend_connected(e, t, ev);
        else
            client_while_connecting(e, t, ev);
        return;
    }
    /* A hang-up may come without EPOLLOUT (a UNIX peer that shut down with
     * our bytes still in its buffer): the send then fails and ends it. */
    if ((ev & EPOLLOUT) || ((ev & (EPOLLHUP | EPOLLERR)) && pending(&t->dir[1 - s]) > 0)) {
        if (flush(e, t, 1 - s))
            return;
        if (t->state == S_CLOSING) {
            if (maybe_finish(e, t))
                return;
        } else {
            rewatch(e, t, s);
            rewatch(e, t, 1 - s);
        }
        if (t->state == S_DEAD || t->fd[s] < 0)
            return;
    }
    if (t->state == S_CLOSING && t->dir[1 - s].shut && pending(&t->dir[1 - s]) == 0) {
        maybe_finish(e, t); /* a lingering side: read, dropped, closed at its EOF */
        return;
    }
    if (may_read(t, s) &&
        ((ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) || (s == CLIENT && t->read_wants_write))) {
        relay_read(e, t, s); /* a reset shows as the read's error */
        return;
    }
    if (ev & EPOLLERR)
        side_failed(e, t, s, read_error(t->fd[s]));
}

/* Serve side s for what it is ready for and waits for; then queue the
 * tunnel if either side still has such work (a full read leaves more). */
static void serve(Engine *e, tunnel_t *t, int s) {
    uint32_t ev = due(t, s);
    if (ev)
        on_event(e, t, s, ev);
    mark(e, t, CLIENT);
    mark(e, t, BACKEND);
}

/* Serve the ready queue, at most QUEUE_BUDGET tunnels; if work is left, the
 * wake-up eventfd makes the engine readable again, so the reactor comes back
 * after its timers and other sockets. */
static void serve_queue(Engine *e) {
    for (int i = 0; i < QUEUE_BUDGET && e->queue.qnext != &e->queue; i++) {
        tunnel_t *t = e->queue.qnext;
        dequeue(t);
        serve(e, t, CLIENT);
        if (t->state != S_DEAD)
            serve(e, t, BACKEND);
    }
    if (e->queue.qnext != &e->queue && !e->wake_armed) {
        uint64_t one = 1;
        if (write(e->wake_fd, &one, sizeof one) == sizeof one)
            e->wake_armed = 1;
    }
}

/* -- the Python type ----------------------------------------------------------- */

/* Whether records or notices wait to be taken: Python skips two calls per wake-up otherwise. */
static PyObject *news(Engine *e) {
    return PyBool_FromLong(PyList_GET_SIZE(e->records) > 0 || PyList_GET_SIZE(e->notices) > 0);
}

static void sweep(Engine *e);

/* Wait up to timeout_ms for events (0: only take what is ready) and handle
 * them all. Returns 1 if the reactor's epoll descriptor is ready, 0 if not,
 * -1 with an exception set. */
static int handle(Engine *e, int timeout_ms) {
    struct epoll_event events[MAX_EVENTS];
    int n;
    if (timeout_ms != 0) {
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait(e->epfd, events, MAX_EVENTS, timeout_ms);
        Py_END_ALLOW_THREADS
    } else {
        n = epoll_wait(e->epfd, events, MAX_EVENTS, 0);
    }
    if (n < 0) {
        if (errno == EINTR)
            return 1; /* a signal: Python's handlers run, and the reactor looks around */
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    int reactor = 0;
    e->running = 1;
    for (int i = 0; i < n; i++) {
        uint64_t tag = events[i].data.u64;
        int kind = (int)(tag & 3);
        void *ptr = (void *)(uintptr_t)(tag & ~(uint64_t)3);
        if (kind == TAG_LISTENER) {
            listener_t *l = ptr;
            if (l->fd >= 0)
                accept_clients(e, l);
        } else if (tag == TAG_REACTOR) {
            reactor = 1;
        } else if (tag == TAG_WAKE) {
            uint64_t count;
            if (read(e->wake_fd, &count, sizeof count) == sizeof count)
                e->wake_armed = 0;
        } else {
            tunnel_t *t = ptr;
            if (t->state == S_DEAD || t->fd[kind] < 0)
                continue; /* ended earlier in this batch */
            t->ready[kind] |= events[i].events;
            serve(e, t, kind);
        }
    }
    serve_queue(e);
    e->running = 0;
    bury(e);
    announce(e);
    return reactor;
}

static PyObject *Engine_run(Engine *e, PyObject *Py_UNUSED(unused)) {
    if (handle(e, 0) < 0)
        return NULL;
    return news(e);
}

/* wait(timeout): the reactor's poll, when the engine holds the reactor's
 * epoll descriptor (nest()). The engine's sockets then wake the process
 * directly, not through a second epoll and the reactor's dispatch, and the
 * engine keeps waiting and handling (GIL released while it blocks) until
 * Python has something to do: the reactor's descriptors are ready (or a
 * signal came), its next timer (timeout seconds; None: none) is due, a
 * notice or RECORD_BATCH records wait, records are TICK old or the engine
 * is empty, or the last tunnel ended (a drain waits for that). It sweeps its
 * own timers every TICK meanwhile. Returns
 * 1 | 2: 1 records or notices to take, 2 the reactor's descriptors are ready. */
static PyObject *Engine_wait(Engine *e, PyObject *arg) {
    double start = now(), deadline = -1; /* the reactor's timer; -1: none */
    if (arg != Py_None) {
        double seconds = PyFloat_AsDouble(arg);
        if (seconds == -1.0 && PyErr_Occurred())
            return NULL;
        deadline = start + (seconds > 0 ? seconds : 0);
    }
    long before = e->active;
    int reactor = 0;
    for (;;) {
        double t = now();
        if (e->active > 0 && t >= e->next_tick) {
            sweep(e);
            e->next_tick = t + TICK;
        }
        /* Checked before blocking: a sweep may have ended the last tunnel. */
        Py_ssize_t records = PyList_GET_SIZE(e->records);
        if (PyList_GET_SIZE(e->notices) > 0 || records >= RECORD_BATCH ||
            (records > 0 && (e->active == 0 || t - start >= TICK)) || (before > 0 && e->active == 0))
            break;
        double until = deadline;
        if (e->active > 0 && (until < 0 || e->next_tick < until))
            until = e->next_tick;
        int timeout_ms = -1;
        if (until >= 0) {
            /* Rounded up, as Python's select.epoll does: never wake before a timer is due. */
            double ms = until > t ? (until - t) * 1000.0 : 0;
            timeout_ms = ms >= 0x7fffffff ? 0x7fffffff : (int)ms + (ms > (int)ms);
        }
        reactor = handle(e, timeout_ms);
        if (reactor < 0 || PyErr_CheckSignals() < 0)
            return NULL;
        /* A due reactor timer still lets the ready events above be handled once. */
        if (reactor || (deadline >= 0 && now() >= deadline))
            break;
    }
    int more = PyList_GET_SIZE(e->records) > 0 || PyList_GET_SIZE(e->notices) > 0;
    return PyLong_FromLong(more | (reactor << 1));
}

/* nest(fd): watch the reactor's epoll descriptor, for wait(). */
static PyObject *Engine_nest(Engine *e, PyObject *arg) {
    int fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_REACTOR};
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* The close grace passed. Sides still taking what they are owed (a slow
 * reader) get another grace: only --fin-timeout ends them, as it would a
 * half-closed tunnel. A tunnel whose sides took nothing since the last check
 * is reset (a stalled reader, within two graces); one owing nothing more (a
 * lingering peer that did not close) is closed without a reset. */
static void grace_expired(Engine *e, tunnel_t *t) {
    size_t owed = 0;
    for (int s = 0; s < 2; s++)
        if (t->fd[s] >= 0)
            owed += owed_to(t, s);
    if (owed > 0 && owed < t->owed) {
        t->owed = owed < UINT32_MAX ? (uint32_t)owed : UINT32_MAX - 1;
        t->grace_at = now() + t->profile->grace;
    } else if (owed > 0) {
        abort_tunnel(e, t);
    } else {
        for (int s = 0; s < 2; s++)
            unwatch_close(e, t, s, 0);
        end_tunnel(e, t);
    }
}

/* Fire the timers that are due. */
static void sweep(Engine *e) {
    double t_now = now();
    tunnel_t *t = e->head.next;
    while (t != &e->head) {
        tunnel_t *next = t->next;
        if (t->state == S_HANDSHAKE) {
            if (t_now >= t->deadline) {
                note(t, PROXY, K_TIMEOUT, "TLS handshake timeout (%g s)", t->profile->tls_timeout);
                abort_tunnel(e, t);
            }
        } else if (t->state == S_CONNECTING) {
            if (t_now >= t->deadline) {
                char why[64];
                snprintf(why, sizeof why, "connect timeout (%g s)", t->profile->connect_timeout);
                attempt_failed(e, t, why, 1, 1);
                try_backends(e, t);
            }
        } else if (t->state == S_CLOSING) {
            if (t->fin_at > 0 && t_now >= t->fin_at) {
                note(t, PROXY, K_TIMEOUT, "fin timeout (%g s half-closed)", t->profile->fin);
                abort_tunnel(e, t);
            } else if (t->grace_at > 0 && t_now >= t->grace_at) {
                grace_expired(e, t);
            }
        } else if (t->fin_at > 0 && t_now >= t->fin_at) {
            note(t, PROXY, K_TIMEOUT, "fin timeout (%g s half-closed)", t->profile->fin);
            abort_tunnel(e, t);
        } else if (t->profile->idle > 0 && t_now - t->last_moved >= t->profile->idle) {
            note(t, PROXY, K_TIMEOUT, "idle timeout (%g s without data)", t->profile->idle);
            close_both(e, t);
        }
        t = next;
    }
    serve_queue(e);
    bury(e);
    announce(e);
}

static PyObject *Engine_tick(Engine *e, PyObject *Py_UNUSED(unused)) {
    sweep(e);
    return news(e);
}

static PyObject *Engine_abort_all(Engine *e, PyObject *arg) {
    const char *reason = PyUnicode_AsUTF8(arg);
    if (reason == NULL)
        return NULL;
    while (e->head.next != &e->head) {
        tunnel_t *t = e->head.next;
        note(t, PROXY, K_SHUTDOWN, "%s", reason);
        abort_tunnel(e, t);
    }
    bury(e);
    Py_RETURN_NONE;
}

static PyTypeObject ProfileType;
static PyTypeObject PoolType;

/* close_backend(pool, index, reason): --close-on-down. Reset the tunnels
 * joined to (or connecting to) that backend of that pool, whatever profile
 * they began with; each is recorded with `reason`, as the proxy's shutdown. */
static PyObject *Engine_close_backend(Engine *e, PyObject *args) {
    PyObject *pool;
    int index;
    const char *reason;
    if (!PyArg_ParseTuple(args, "O!is", &PoolType, &pool, &index, &reason))
        return NULL;
    if (index < 0 || index >= ((Pool *)pool)->n) {
        PyErr_Format(PyExc_IndexError, "the pool has no backend %d", index);
        return NULL;
    }
    long closed = 0;
    for (tunnel_t *t = e->head.next, *next; t != &e->head; t = next) {
        next = t->next;
        if (!t->counted || (PyObject *)t->profile->pool != pool || t->backend_index != index)
            continue;
        forget(t); /* a half-close noted before did not end it: this did */
        note(t, PROXY, K_SHUTDOWN, "%s", reason);
        abort_tunnel(e, t);
        closed++;
    }
    bury(e);
    return PyLong_FromLong(closed);
}

/* The slot of listener index `index`, or NULL with ValueError; with
 * `added`, only one that add_listener() has used. */
static slot_t *slot_at(Engine *e, int index, int added) {
    if (index < 0 || index >= MAX_LISTENERS) {
        PyErr_Format(PyExc_ValueError, "listener index %d is not in 0..%d", index, MAX_LISTENERS - 1);
        return NULL;
    }
    if (added && !e->slots[index].added) {
        PyErr_Format(PyExc_ValueError, "no listener was added with index %d", index);
        return NULL;
    }
    return &e->slots[index];
}

/* The scratch buffer fits every profile in use: a read of read_size, or a
 * few TLS records whatever --read-size says. It only grows, and only here
 * (between events), so no read holds the old one. */
static int fit_scratch(Engine *e, const Profile *p) {
    size_t need = p->tls_new != NULL && p->read_size < 4 * TLS_RECORD ? 4 * TLS_RECORD : p->read_size;
    if (need <= e->scratch_size)
        return 0;
    char *scratch = realloc(e->scratch, need);
    if (scratch == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    e->scratch = scratch;
    e->scratch_size = need;
    return 0;
}

/* Listener index `index` serves its new tunnels with `profile` from now on.
 * The tunnels it has keep the profile they began with (their reference). */
static int use_profile(Engine *e, slot_t *slot, PyObject *profile) {
    if (!PyObject_TypeCheck(profile, &ProfileType)) {
        PyErr_Format(PyExc_TypeError, "profile must be a tunnelkit.engine._engine.Profile, not %.200s",
                     Py_TYPE(profile)->tp_name);
        return -1;
    }
    if (e->epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "the engine is closed");
        return -1;
    }
    if (fit_scratch(e, (Profile *)profile) < 0)
        return -1;
    Profile *old = slot->profile;
    slot->profile = (Profile *)Py_NewRef(profile);
    Py_XDECREF(old);
    return 0;
}

static PyObject *Engine_add_listener(Engine *e, PyObject *args) {
    int fd, id;
    PyObject *profile;
    if (!PyArg_ParseTuple(args, "iiO", &fd, &id, &profile))
        return NULL;
    slot_t *slot = slot_at(e, id, 0);
    if (slot == NULL)
        return NULL;
    for (int i = 0; i < MAX_LISTENERS; i++) {
        listener_t *l = &e->listeners[i];
        if (l->fd >= 0)
            continue;
        Profile *before = slot->profile;
        Py_XINCREF(before);
        if (use_profile(e, slot, profile) < 0) {
            Py_XDECREF(before);
            return NULL;
        }
        /* Exclusive: of the --workers sharing this socket, one is woken per
         * connection, not all (kernels before 4.5 refuse the flag). */
        struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE,
                                 .data.u64 = (uint64_t)(uintptr_t)l | TAG_LISTENER};
        int r = epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev);
        if (r < 0 && errno == EINVAL) {
            ev.events = EPOLLIN;
            r = epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev);
        }
        if (r < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            Profile *made = slot->profile; /* as it was: the index may serve other sockets */
            slot->profile = before;
            Py_DECREF(made);
            return NULL;
        }
        Py_XDECREF(before);
        l->fd = fd;
        l->id = id;
        slot->added = 1;
        Py_RETURN_NONE;
    }
    PyErr_SetString(PyExc_ValueError, "too many listeners for the native engine");
    return NULL;
}

static PyObject *Engine_set_profile(Engine *e, PyObject *args) {
    int id;
    PyObject *profile;
    if (!PyArg_ParseTuple(args, "iO", &id, &profile))
        return NULL;
    slot_t *slot = slot_at(e, id, 1);
    if (slot == NULL || use_profile(e, slot, profile) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_counters(Engine *e, PyObject *arg) {
    int id = PyLong_AsLong(arg);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    slot_t *slot = slot_at(e, id, 1);
    if (slot == NULL)
        return NULL;
    PyObject *values = PyTuple_New(N_COUNTERS);
    for (int i = 0; values != NULL && i < N_COUNTERS; i++) {
        PyObject *value = PyLong_FromUnsignedLongLong(slot->counters[i]);
        if (value == NULL)
            Py_CLEAR(values);
        else
            PyTuple_SET_ITEM(values, i, value);
    }
    return values;
}

static PyObject *Engine_remove_listener(Engine *e, PyObject *arg) {
    int fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    for (int i = 0; i < MAX_LISTENERS; i++) {
        if (e->listeners[i].fd == fd) {
            epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, NULL);
            e->listeners[i].fd = -1;
        }
    }
    Py_RETURN_NONE;
}

/* Hand the list over and start a new one; an empty list stays (a call per
 * reactor wake-up should not allocate when nothing happened). */
static PyObject *take(PyObject **list) {
    if (PyList_GET_SIZE(*list) == 0)
        return PyTuple_New(0);
    PyObject *taken = *list;
    PyObject *fresh = PyList_New(0);
    if (fresh == NULL)
        return NULL;
    *list = fresh;
    return taken;
}

static PyObject *Engine_take_records(Engine *e, PyObject *Py_UNUSED(unused)) { return take(&e->records); }
static PyObject *Engine_take_notices(Engine *e, PyObject *Py_UNUSED(unused)) { return take(&e->notices); }
static PyObject *Engine_fileno(Engine *e, PyObject *Py_UNUSED(unused)) { return PyLong_FromLong(e->epfd); }

/* The live tunnels' sockets and states, for tests and diagnostics. */
static PyObject *Engine_tunnels(Engine *e, PyObject *Py_UNUSED(unused)) {
    static const char *STATES[] = {"connecting", "joined", "closing", "dead", "handshake"};
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    for (tunnel_t *t = e->head.next; t != &e->head; t = t->next) {
        PyObject *item = Py_BuildValue("(iis)", t->fd[CLIENT], t->fd[BACKEND], STATES[t->state]);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return list;
}

static void close_all(Engine *e) {
    while (e->head.next != &e->head) {
        tunnel_t *t = e->head.next;
        note(t, PROXY, K_SHUTDOWN, "engine closed");
        abort_tunnel(e, t);
    }
    bury(e);
    /* The profiles' client policies are methods of the object that holds
     * this engine: let them go, the counters stay readable. */
    for (int i = 0; i < MAX_LISTENERS; i++)
        Py_CLEAR(e->slots[i].profile);
    shrink_pool(e, 1);
    if (e->epfd >= 0)
        close(e->epfd);
    if (e->reserve_fd >= 0)
        close(e->reserve_fd);
    if (e->wake_fd >= 0)
        close(e->wake_fd);
    e->epfd = e->reserve_fd = e->wake_fd = -1;
}

static PyObject *Engine_close(Engine *e, PyObject *Py_UNUSED(unused)) {
    close_all(e);
    Py_RETURN_NONE;
}

static int Engine_init(Engine *e, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"max_tunnels", "fd_slots", NULL};
    if (e->epfd >= 0) {
        PyErr_SetString(PyExc_TypeError, "an Engine is initialized once");
        return -1;
    }
    e->max_tunnels = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$ll", kwlist, &e->max_tunnels, &e->fd_slots))
        return -1;
    if (e->max_tunnels <= 0) {
        PyErr_SetString(PyExc_ValueError, "max_tunnels must be given, and positive");
        return -1;
    }
    if (e->fd_slots < 0) {
        PyErr_SetString(PyExc_ValueError, "fd_slots must be 0 (no limit) or positive");
        return -1;
    }
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    e->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event wake = {.events = EPOLLIN, .data.u64 = TAG_WAKE};
    if (e->epfd < 0 || e->wake_fd < 0 || epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->wake_fd, &wake) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    e->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    return 0;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds)) {
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    if (e == NULL)
        return NULL;
    e->epfd = e->reserve_fd = e->wake_fd = -1;
    e->head.next = e->head.prev = &e->head;
    e->queue.qnext = e->queue.qprev = &e->queue;
    for (int i = 0; i < MAX_LISTENERS; i++)
        e->listeners[i].fd = -1;
    e->records = PyList_New(0);
    e->notices = PyList_New(0);
    e->changes = PyList_New(0);
    if (e->records == NULL || e->notices == NULL || e->changes == NULL) {
        Py_DECREF(e);
        return NULL;
    }
    return (PyObject *)e;
}

static void Engine_dealloc(Engine *e) {
    e->quiet = 1; /* no records for a dying engine */
    close_all(e);
    Py_XDECREF(e->records);
    Py_XDECREF(e->notices);
    Py_XDECREF(e->changes);
    free(e->scratch);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *Engine_get_active(Engine *e, void *Py_UNUSED(closure)) { return PyLong_FromLong(e->active); }

static PyMethodDef Engine_methods[] = {
    {"run", (PyCFunction)Engine_run, METH_NOARGS,
     "Handle every ready event (never blocks); True if there are records or notices to take."},
    {"wait", (PyCFunction)Engine_wait, METH_O,
     "The reactor's poll: handle events until Python has work (see _engine.c); 1: records or notices, 2: reactor ready."},
    {"nest", (PyCFunction)Engine_nest, METH_O, "Watch the reactor's epoll descriptor fd, for wait()."},
    {"tick", (PyCFunction)Engine_tick, METH_NOARGS,
     "Fire the timers that are due; True if there are records or notices to take."},
    {"abort_all", (PyCFunction)Engine_abort_all, METH_O, "Reset every tunnel, with this reason."},
    {"close_backend", (PyCFunction)Engine_close_backend, METH_VARARGS,
     "close_backend(pool, index, reason): reset the tunnels of that backend; how many."},
    {"add_listener", (PyCFunction)Engine_add_listener, METH_VARARGS,
     "add_listener(fd, index, profile): accept on listening socket fd as listener index, with profile."},
    {"set_profile", (PyCFunction)Engine_set_profile, METH_VARARGS,
     "set_profile(index, profile): new clients of listener index get profile; live tunnels keep theirs."},
    {"counters", (PyCFunction)Engine_counters, METH_O,
     "counters(index): listener index's counters, in COUNTERS order."},
    {"remove_listener", (PyCFunction)Engine_remove_listener, METH_O, "Stop accepting on fd."},
    {"take_records", (PyCFunction)Engine_take_records, METH_NOARGS,
     "The records of the tunnels that ended since the last call."},
    {"take_notices", (PyCFunction)Engine_take_notices, METH_NOARGS,
     "Events for the log since the last call: (name, value) tuples."},
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The epoll descriptor to watch."},
    {"tunnels", (PyCFunction)Engine_tunnels, METH_NOARGS,
     "(client fd, backend fd, state) of every live tunnel."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "Reset every tunnel and free everything."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"active", (getter)Engine_get_active, NULL, "Live tunnels.", NULL},
    {NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tunnelkit.engine._engine.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Accepts, connects and relays plain tunnels; see tunnelkit/engine/driver.py.",
    .tp_new = Engine_new,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

/* -- pools ---------------------------------------------------------------------- */

static int parse_backend(Pool *p, PyObject *item, int i) {
    PyObject *name;
    const char *host;
    int port = 0;
    backend_t *b = &p->backends[i];
    if (!PyTuple_Check(item)) {
        PyErr_Format(PyExc_TypeError, "a backend is (name, host, port) or (name, path), not %.200s",
                     Py_TYPE(item)->tp_name);
        return -1;
    }
    if (!PyArg_ParseTuple(item, "Us|i", &name, &host, &port))
        return -1;
    struct sockaddr_in *a4 = (struct sockaddr_in *)&b->addr;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&b->addr;
    struct sockaddr_un *un = (struct sockaddr_un *)&b->addr;
    if (host[0] == '/') {
        if (strlen(host) >= sizeof un->sun_path) {
            PyErr_Format(PyExc_ValueError, "UNIX socket path too long: %s", host);
            return -1;
        }
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, host);
        b->len = offsetof(struct sockaddr_un, sun_path) + strlen(host) + 1;
    } else if (port < 1 || port > 65535) {
        PyErr_Format(PyExc_ValueError, "backend %s needs a port in 1..65535, not %d", host, port);
        return -1;
    } else if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons(port);
        b->len = sizeof *a4;
    } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons(port);
        b->len = sizeof *a6;
    } else {
        PyErr_Format(PyExc_ValueError, "not an IP address or UNIX socket path: %s", host);
        return -1;
    }
    Py_ssize_t size;
    const char *utf8 = PyUnicode_AsUTF8AndSize(name, &size);
    if (utf8 == NULL)
        return -1;
    b->key = fnv1a64(utf8, (size_t)size);
    b->weight = 1;
    b->up = 1;
    PyTuple_SET_ITEM(p->names, i, Py_NewRef(name));
    return 0;
}

static int parse_backends(Pool *p, PyObject *backends) {
    PyObject *seq = PySequence_Fast(backends, "backends must be a sequence");
    if (seq == NULL)
        return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    if (count < 1 || count > MAX_BACKENDS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "the native engine takes 1 to %d backends, not %zd",
                     MAX_BACKENDS, count);
        return -1;
    }
    p->backends = calloc(count, sizeof *p->backends);
    p->names = PyTuple_New(count);
    if (p->backends == NULL || p->names == NULL) {
        Py_DECREF(seq);
        if (p->backends == NULL)
            PyErr_NoMemory();
        return -1;
    }
    p->n = (int)count;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (parse_backend(p, PySequence_Fast_GET_ITEM(seq, i), (int)i) < 0) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

/* A weight in 0..MAX_WEIGHT, or -1 with ValueError. */
static int parse_weight(PyObject *value) {
    long weight = PyLong_AsLong(value);
    if (weight == -1 && PyErr_Occurred())
        return -1;
    if (weight < 0 || weight > MAX_WEIGHT) {
        PyErr_Format(PyExc_ValueError, "a weight is in 0..%d, not %ld", MAX_WEIGHT, weight);
        return -1;
    }
    return (int)weight;
}

/* weights= or backups=: one value per backend, in order, or None. */
static int parse_per_backend(Pool *p, PyObject *values, const char *what, int weights) {
    if (values == Py_None)
        return 0;
    PyObject *seq = PySequence_Fast(values, "weights and backups must be sequences or None");
    if (seq == NULL)
        return -1;
    if (PySequence_Fast_GET_SIZE(seq) != p->n) {
        PyErr_Format(PyExc_ValueError, "%s must have one value per backend (%d), not %zd", what,
                     p->n, PySequence_Fast_GET_SIZE(seq));
        Py_DECREF(seq);
        return -1;
    }
    for (int i = 0; i < p->n; i++) {
        PyObject *value = PySequence_Fast_GET_ITEM(seq, i);
        int v = weights ? parse_weight(value) : PyObject_IsTrue(value);
        if (v < 0) {
            Py_DECREF(seq);
            return -1;
        }
        if (weights)
            p->backends[i].weight = v;
        else
            p->backends[i].backup = v;
    }
    Py_DECREF(seq);
    return 0;
}

/* The settings' ranges, each with the message a caller can act on. */
static int check_pool(Pool *p, const char *balance, PyObject *on_change) {
    p->balance = -1;
    for (int i = 0; i < N_BALANCES; i++)
        if (strcmp(balance, BALANCE_NAMES[i]) == 0)
            p->balance = i;
    const char *why =
        p->balance < 0 ? "balance must be one of first, round-robin, least-conn, random, source-hash"
        : p->max_conn < 0 ? "max_conn must be 0 (no limit) or positive"
        : p->retries < -1 ? "retries must be -1 (every backend once) or at least 0"
        : p->eject_after < 0 ? "eject_after must be 0 (no passive ejection) or positive"
        : !(p->eject_base > 0) || !(p->eject_max >= p->eject_base)
            ? "eject_base must be positive, and eject_max at least eject_base"
            : NULL;
    if (why != NULL) {
        PyErr_SetString(PyExc_ValueError, why);
        return -1;
    }
    if (on_change != Py_None && !PyCallable_Check(on_change)) {
        PyErr_SetString(PyExc_TypeError, "on_change must be callable or None");
        return -1;
    }
    p->on_change = on_change != Py_None ? Py_NewRef(on_change) : NULL;
    return 0;
}

static PyObject *Pool_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"backends", "balance", "weights", "backups", "max_conn", "retries",
                             "eject_after", "eject_base", "eject_max", "on_change", NULL};
    PyObject *backends, *weights = Py_None, *backups = Py_None, *on_change = Py_None;
    const char *balance = "first";
    Pool *p = (Pool *)type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    p->retries = -1;
    p->eject_base = 1.0;
    p->eject_max = 60.0;
    /* random's seed: this pool's own sequence, in every process. */
    p->rng = mix64((uint64_t)(uintptr_t)p ^ (uint64_t)(now() * 1e9) ^ (uint64_t)getpid());
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$sOOliiddO", kwlist, &backends, &balance,
                                     &weights, &backups, &p->max_conn, &p->retries, &p->eject_after,
                                     &p->eject_base, &p->eject_max, &on_change) ||
        check_pool(p, balance, on_change) < 0 || parse_backends(p, backends) < 0 ||
        parse_per_backend(p, weights, "weights", 1) < 0 ||
        parse_per_backend(p, backups, "backups", 0) < 0) {
        Py_DECREF(p);
        return NULL;
    }
    return (PyObject *)p;
}

static int Pool_traverse(Pool *p, visitproc visit, void *arg) {
    Py_VISIT(p->on_change);
    return 0;
}

static int Pool_clear(Pool *p) {
    Py_CLEAR(p->on_change);
    return 0;
}

static void Pool_dealloc(Pool *p) {
    PyObject_GC_UnTrack(p);
    Pool_clear(p);
    Py_XDECREF(p->names);
    free(p->backends);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

/* The backend at index, or NULL with IndexError. */
static backend_t *backend_at(Pool *p, int index) {
    if (index < 0 || index >= p->n) {
        PyErr_Format(PyExc_IndexError, "the pool has no backend %d", index);
        return NULL;
    }
    return &p->backends[index];
}

/* set(index, *, up=None, weight=None): Python's health checks and slow start. */
static PyObject *Pool_set(Pool *p, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"index", "up", "weight", NULL};
    int index;
    PyObject *up = Py_None, *weight = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|$OO", kwlist, &index, &up, &weight))
        return NULL;
    backend_t *b = backend_at(p, index);
    if (b == NULL)
        return NULL;
    int w = weight != Py_None ? parse_weight(weight) : b->weight;
    int u = up != Py_None ? PyObject_IsTrue(up) : b->up;
    if (w < 0 || u < 0)
        return NULL;
    if (u && !b->up) {
        /* Checks that passed rise times say more than the failures that
         * ejected it: back in at once, as on Twisted's plane. */
        b->failures = b->ejections = 0;
        b->ejected_until = 0;
    }
    b->weight = w;
    b->up = u;
    Py_RETURN_NONE;
}

/* states(): per backend (active, up, ejected seconds left, failures in a
 * row, weight, tunnels joined to it, failed attempts). */
static PyObject *Pool_states(Pool *p, PyObject *Py_UNUSED(unused)) {
    double t_now = now();
    PyObject *states = PyTuple_New(p->n);
    for (int i = 0; states != NULL && i < p->n; i++) {
        const backend_t *b = &p->backends[i];
        double left = b->ejected_until > t_now ? b->ejected_until - t_now : 0.0;
        PyObject *state = Py_BuildValue("(lOdiiKK)", b->active, b->up ? Py_True : Py_False, left,
                                        b->failures, b->weight, b->connections, b->failed);
        if (state == NULL)
            Py_CLEAR(states);
        else
            PyTuple_SET_ITEM(states, i, state);
    }
    return states;
}

static PyObject *Pool_get_names(Pool *p, void *Py_UNUSED(closure)) { return Py_NewRef(p->names); }

static PyMethodDef Pool_methods[] = {
    {"set", (PyCFunction)(void (*)(void))Pool_set, METH_VARARGS | METH_KEYWORDS,
     "set(index, *, up=None, weight=None): backend index's health or weight, from now on."},
    {"states", (PyCFunction)Pool_states, METH_NOARGS,
     "Per backend: (active, up, ejected seconds left, failures in a row, weight, connections, failed attempts)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Pool_getset[] = {
    {"names", (getter)Pool_get_names, NULL, "The backends' names, in order.", NULL},
    {NULL},
};

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tunnelkit.engine._engine.Pool",
    .tp_basicsize = sizeof(Pool),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A listener's backends, their state, and how each connection picks among them.",
    .tp_new = Pool_new,
    .tp_traverse = (traverseproc)Pool_traverse,
    .tp_clear = (inquiry)Pool_clear,
    .tp_dealloc = (destructor)Pool_dealloc,
    .tp_methods = Pool_methods,
    .tp_getset = Pool_getset,
};

/* source_hash_scores(client, names, weights): each backend's score for a
 * client of that packed address (4 or 16 bytes, or b"" for UNIX clients):
 * the highest takes it. For the tests that hold Python's picks to these. */
static PyObject *source_hash_scores(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer client;
    PyObject *names, *weights;
    if (!PyArg_ParseTuple(args, "y*OO", &client, &names, &weights))
        return NULL;
    uint64_t key = fnv1a64(client.buf, (size_t)client.len);
    PyBuffer_Release(&client);
    PyObject *n = PySequence_Fast(names, "names must be a sequence");
    PyObject *w = n != NULL ? PySequence_Fast(weights, "weights must be a sequence") : NULL;
    PyObject *scores = NULL;
    if (w != NULL && PySequence_Fast_GET_SIZE(n) != PySequence_Fast_GET_SIZE(w))
        PyErr_SetString(PyExc_ValueError, "names and weights must be as long");
    else if (w != NULL)
        scores = PyTuple_New(PySequence_Fast_GET_SIZE(n));
    for (Py_ssize_t i = 0; scores != NULL && i < PyTuple_GET_SIZE(scores); i++) {
        Py_ssize_t size;
        const char *name = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(n, i), &size);
        int weight = name != NULL ? parse_weight(PySequence_Fast_GET_ITEM(w, i)) : -1;
        PyObject *score = weight >= 0 ? PyFloat_FromDouble(hash_score(key, fnv1a64(name, (size_t)size), weight)) : NULL;
        if (score == NULL)
            Py_CLEAR(scores);
        else
            PyTuple_SET_ITEM(scores, i, score);
    }
    Py_XDECREF(n);
    Py_XDECREF(w);
    return scores;
}

/* -- profiles ------------------------------------------------------------------- */

/* tls=((the addresses of SSL_do_handshake, SSL_read, SSL_write, SSL_shutdown,
 * SSL_get_error, ERR_clear_error, ERR_get_error, ERR_reason_error_string),
 * new_connection(fd) -> (SSL address, owner), handshake timeout) */
static int parse_tls(Profile *p, PyObject *tls) {
    unsigned long long f[8];
    PyObject *factory;
    if (!PyTuple_Check(tls)) {
        PyErr_SetString(PyExc_TypeError, "tls must be (functions, new_connection, handshake timeout) or None");
        return -1;
    }
    if (!PyArg_ParseTuple(tls, "(KKKKKKKK)Od", &f[0], &f[1], &f[2], &f[3], &f[4], &f[5], &f[6],
                          &f[7], &factory, &p->tls_timeout))
        return -1;
    for (int i = 0; i < 8; i++) {
        if (f[i] == 0) {
            PyErr_SetString(PyExc_ValueError, "a TLS function address is 0");
            return -1;
        }
    }
    if (!PyCallable_Check(factory)) {
        PyErr_SetString(PyExc_TypeError, "new_connection must be callable");
        return -1;
    }
    if (!(p->tls_timeout > 0)) {
        PyErr_SetString(PyExc_ValueError, "the TLS handshake timeout must be positive");
        return -1;
    }
    p->tls.do_handshake = (int (*)(void *))(uintptr_t)f[0];
    p->tls.read = (int (*)(void *, void *, int))(uintptr_t)f[1];
    p->tls.write = (int (*)(void *, const void *, int))(uintptr_t)f[2];
    p->tls.shutdown = (int (*)(void *))(uintptr_t)f[3];
    p->tls.get_error = (int (*)(const void *, int))(uintptr_t)f[4];
    p->tls.clear_error = (void (*)(void))(uintptr_t)f[5];
    p->tls.next_error = (unsigned long (*)(void))(uintptr_t)f[6];
    p->tls.reason = (const char *(*)(unsigned long))(uintptr_t)f[7];
    p->tls_new = Py_NewRef(factory);
    return 0;
}

/* The settings' ranges, each with the message a caller can act on. */
static int check_profile(Profile *p, Py_ssize_t read_size, Py_ssize_t bulk_read, const char *splice) {
    static const char *SPLICE[] = {"off", "auto", "on"};
    p->splice_mode = -1;
    for (int i = 0; i < 3; i++)
        if (strcmp(splice, SPLICE[i]) == 0)
            p->splice_mode = i;
    const char *why = p->splice_mode < 0 ? "splice must be 'off', 'auto' or 'on'"
                      : read_size <= 0 || bulk_read <= 0 ? "read_size and bulk_read must be positive"
                      : !(p->idle >= 0) || !(p->fin >= 0) ? "idle and fin must be 0 (none) or positive"
                      : !(p->grace > 0) ? "grace must be positive"
                      : !(p->connect_timeout > 0) ? "connect_timeout must be positive"
                      : p->keepalive < -1 || p->sndbuf < -1 || p->rcvbuf < -1 || p->mss < -1
                          ? "keepalive, sndbuf, rcvbuf and mss must be -1 (unset) or at least 0"
                          : NULL;
    if (why != NULL) {
        PyErr_SetString(PyExc_ValueError, why);
        return -1;
    }
    p->read_size = read_size;
    p->bulk_read = bulk_read;
    return 0;
}

static PyObject *Profile_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"backends", "read_size", "bulk_read", "splice", "idle", "fin",
                             "grace", "connect_timeout", "half_close", "log_records", "nodelay",
                             "keepalive", "sndbuf", "rcvbuf", "mss", "client_check", "tls",
                             "context", "proxy_protocol", "proxy_tlvs", "clients", NULL};
    PyObject *backends, *check = Py_None, *tls = Py_None, *context = Py_None, *tlvs = Py_None;
    PyObject *clients = Py_None;
    Py_ssize_t read_size, bulk_read;
    const char *splice;
    Profile *p = (Profile *)type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    p->keepalive = p->sndbuf = p->rcvbuf = p->mss = -1;
    p->nodelay = p->half_close = p->log_records = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Onnsdddd|$pppiiiiOOOiOO", kwlist, &backends,
                                     &read_size, &bulk_read, &splice, &p->idle, &p->fin, &p->grace,
                                     &p->connect_timeout, &p->half_close, &p->log_records,
                                     &p->nodelay, &p->keepalive, &p->sndbuf, &p->rcvbuf, &p->mss,
                                     &check, &tls, &context, &p->proxy_protocol, &tlvs, &clients) ||
        check_profile(p, read_size, bulk_read, splice) < 0)
        goto fail;
    /* A sequence of backends as before: an ordered pool that tries each once. */
    p->pool = (Pool *)(PyObject_TypeCheck(backends, &PoolType)
                           ? Py_NewRef(backends)
                           : PyObject_CallOneArg((PyObject *)&PoolType, backends));
    if (p->pool == NULL)
        goto fail;
    if (check != Py_None && !PyCallable_Check(check)) {
        PyErr_SetString(PyExc_TypeError, "client_check must be callable or None");
        goto fail;
    }
    if (tls != Py_None && parse_tls(p, tls) < 0)
        goto fail;
    if (p->proxy_protocol < 0 || p->proxy_protocol > 2) {
        PyErr_SetString(PyExc_ValueError, "proxy_protocol must be 0 (none), 1 or 2");
        goto fail;
    }
    if (tlvs != Py_None && !PyCallable_Check(tlvs)) {
        PyErr_SetString(PyExc_TypeError, "proxy_tlvs must be callable or None");
        goto fail;
    }
    if (clients != Py_None && !PyObject_TypeCheck(clients, &ClientTableType)) {
        PyErr_SetString(PyExc_TypeError, "clients must be a ClientTable or None");
        goto fail;
    }
    p->clients = clients != Py_None ? (ClientTable *)Py_NewRef(clients) : NULL;
    p->proxy_tlvs = tlvs != Py_None ? Py_NewRef(tlvs) : NULL;
    p->client_check = check != Py_None ? Py_NewRef(check) : NULL;
    p->context = Py_NewRef(context);
    return (PyObject *)p;
fail:
    Py_DECREF(p);
    return NULL;
}

static int Profile_traverse(Profile *p, visitproc visit, void *arg) {
    Py_VISIT(p->pool);
    Py_VISIT(p->client_check);
    Py_VISIT(p->tls_new);
    Py_VISIT(p->context);
    Py_VISIT(p->proxy_tlvs);
    return 0;
}

/* The pool stays while the profile lives (its tunnels use it): clearing
 * the pool's on_change breaks the cycles through it. */
static int Profile_clear(Profile *p) {
    Py_CLEAR(p->client_check);
    Py_CLEAR(p->tls_new);
    Py_CLEAR(p->context);
    Py_CLEAR(p->proxy_tlvs);
    return 0;
}

static void Profile_dealloc(Profile *p) {
    PyObject_GC_UnTrack(p);
    Profile_clear(p);
    Py_XDECREF(p->pool);
    Py_XDECREF(p->clients);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *Profile_get_context(Profile *p, void *Py_UNUSED(closure)) {
    return Py_NewRef(p->context != NULL ? p->context : Py_None);
}

static PyObject *Profile_get_backends(Profile *p, void *Py_UNUSED(closure)) {
    return Py_NewRef(p->pool->names);
}

static PyObject *Profile_get_pool(Profile *p, void *Py_UNUSED(closure)) {
    return Py_NewRef((PyObject *)p->pool);
}

static PyObject *Profile_get_clients(Profile *p, void *Py_UNUSED(closure)) {
    return Py_NewRef(p->clients != NULL ? (PyObject *)p->clients : Py_None);
}

static PyGetSetDef Profile_getset[] = {
    {"context", (getter)Profile_get_context, NULL, "The context object given at creation.", NULL},
    {"backends", (getter)Profile_get_backends, NULL, "The backends' names, in order.", NULL},
    {"pool", (getter)Profile_get_pool, NULL, "The backends' Pool.", NULL},
    {"clients", (getter)Profile_get_clients, NULL, "The per-client limits' ClientTable, or None.", NULL},
    {NULL},
};

static PyTypeObject ProfileType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tunnelkit.engine._engine.Profile",
    .tp_basicsize = sizeof(Profile),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "How a listener's tunnels are served: backends, timeouts, socket options, TLS, logging, client policy.",
    .tp_new = Profile_new,
    .tp_traverse = (traverseproc)Profile_traverse,
    .tp_clear = (inquiry)Profile_clear,
    .tp_dealloc = (destructor)Profile_dealloc,
    .tp_getset = Profile_getset,
};

/* -- the module ------------------------------------------------------------------ */

static PyMethodDef engine_functions[] = {
    {"source_hash_scores", source_hash_scores, METH_VARARGS,
     "source_hash_scores(client, names, weights): each backend's source-hash score for that packed client address."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT, "tunnelkit.engine._engine", "tunnelkit's native relay engine.", -1, engine_functions, NULL, NULL, NULL, NULL,
};

/* A tuple of the n strings of names, as a module constant. */
static int add_names(PyObject *m, const char *constant, const char **names, Py_ssize_t n) {
    PyObject *tuple = PyTuple_New(n);
    for (Py_ssize_t i = 0; tuple != NULL && i < n; i++) {
        PyObject *name = PyUnicode_FromString(names[i]);
        if (name == NULL)
            Py_CLEAR(tuple);
        else
            PyTuple_SET_ITEM(tuple, i, name);
    }
    if (tuple == NULL || PyModule_AddObject(m, constant, tuple) < 0) {
        Py_XDECREF(tuple);
        return -1;
    }
    return 0;
}

static int add_type(PyObject *m, const char *name, PyTypeObject *type) {
    Py_INCREF(type);
    if (PyModule_AddObject(m, name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

#define COUNT(array) ((Py_ssize_t)(sizeof(array) / sizeof(array)[0]))

PyMODINIT_FUNC PyInit__engine(void) {
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&ProfileType) < 0 ||
        PyType_Ready(&PoolType) < 0 || PyType_Ready(&ClientTableType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&engine_module);
    if (m == NULL)
        return NULL;
    /* Python checks the options against these before making an Engine, and
     * builds its records and counters from the names (the relay contract). */
    if (PyModule_AddIntConstant(m, "MAX_BACKENDS", MAX_BACKENDS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_LISTENERS", MAX_LISTENERS) < 0 ||
        PyModule_AddObject(m, "TICK", PyFloat_FromDouble(TICK)) < 0 ||
        add_names(m, "SIDES", SIDE_NAMES, COUNT(SIDE_NAMES)) < 0 ||
        add_names(m, "CLOSE_KINDS", KIND_NAMES, COUNT(KIND_NAMES)) < 0 ||
        add_names(m, "RECORD_FIELDS", RECORD_FIELDS, COUNT(RECORD_FIELDS)) < 0 ||
        add_names(m, "COUNTERS", COUNTER_NAMES, N_COUNTERS) < 0 ||
        add_names(m, "BALANCES", BALANCE_NAMES, N_BALANCES) < 0 ||
        add_type(m, "Engine", &EngineType) < 0 || add_type(m, "Profile", &ProfileType) < 0 ||
        add_type(m, "Pool", &PoolType) < 0 || add_type(m, "ClientTable", &ClientTableType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
