/* Tiny static HTTP server used as the test workload, in containers and VMs.
 *
 * Listens on $PORT (else $PORT_HTTP, else 8080) on all addresses and answers
 * every request with "hello from $MESSAGE\n". Logs to stdout. Test knobs:
 *   IGNORE_SIGTERM=1  ignore SIGTERM (an uncooperative guest)
 *   EXIT_AFTER=N      exit(1) after N seconds (a flapping workload)
 *   QUIET=1           log no request lines (under TCG a guest's console write per
 *                     request is ~10% of its cost: benches of the network path set it)
 * A peer probe (bridged networks): GET /get/<host>/<port> resolves <host> (an IPv4
 * literal, else an A query of its own to the first nameserver of $RESOLV_CONF or
 * /etc/resolv.conf: a static binary and a unikernel have no NSS), fetches / from it and
 * answers 200 with the peer's body, or 502 with why ("resolve ...", "connect ...").
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/time.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <errno.h>

static void on_term(int sig) {
    (void)sig;
    static const char msg[] = "hello: SIGTERM, shutting down\n";
    write(1, msg, sizeof msg - 1);
    _exit(0);
}

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "hello: EXIT_AFTER reached\n";
    write(1, msg, sizeof msg - 1);
    _exit(1);
}

/* The A record of name from the first nameserver in the resolver file; 0 on success. */
static int resolve(const char *name, struct in_addr *out, char *why, size_t wl) {
    if (inet_aton(name, out)) return 0;
    const char *conf = getenv("RESOLV_CONF");
    FILE *f = fopen(conf ? conf : "/etc/resolv.conf", "r");
    char line[256], ns[64] = "";
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "nameserver %63s", ns) == 1) break;
    if (f) fclose(f);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(53);
    if (!ns[0] || !inet_aton(ns, &sa.sin_addr)) {
        snprintf(why, wl, "resolve %s: no nameserver", name);
        return -1;
    }
    unsigned char q[300] = {0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0}, a[1500];
    size_t qn = 12;
    for (const char *p = name; *p;) {
        const char *dot = strchr(p, '.');
        size_t len = dot ? (size_t)(dot - p) : strlen(p);
        if (len == 0 || len > 63 || qn + len + 6 > sizeof q) {
            snprintf(why, wl, "resolve %s: bad name", name);
            return -1;
        }
        q[qn++] = (unsigned char)len;
        memcpy(q + qn, p, len);
        qn += len;
        p += len + (dot ? 1 : 0);
    }
    q[qn++] = 0; q[qn++] = 0; q[qn++] = 1; q[qn++] = 0; q[qn++] = 1;
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    ssize_t n = -1;
    for (int attempt = 0; attempt < 2 && n < 12; attempt++) {
        sendto(s, q, qn, 0, (struct sockaddr *)&sa, sizeof sa);
        struct pollfd pf = {s, POLLIN, 0};
        if (poll(&pf, 1, 2000) == 1) n = recv(s, a, sizeof a, 0);
    }
    close(s);
    if (n < 12) {
        snprintf(why, wl, "resolve %s: no answer from %s", name, ns);
        return -1;
    }
    if ((a[3] & 0x0f) != 0 || (a[6] << 8 | a[7]) == 0) {
        snprintf(why, wl, "resolve %s: %s", name, (a[3] & 0x0f) == 3 ? "no such name" : "no address");
        return -1;
    }
    size_t i = qn;   /* the answer repeats the question first */
    for (int k = 0; k < (a[6] << 8 | a[7]) && i + 12 <= (size_t)n; k++) {
        if ((a[i] & 0xc0) == 0xc0) i += 2;
        else { while (i < (size_t)n && a[i]) i += a[i] + 1; i++; }
        if (i + 10 > (size_t)n) break;
        int type = a[i] << 8 | a[i + 1], rdlen = a[i + 8] << 8 | a[i + 9];
        i += 10;
        if (type == 1 && rdlen == 4 && i + 4 <= (size_t)n) {
            memcpy(out, a + i, 4);
            return 0;
        }
        i += (size_t)rdlen;
    }
    snprintf(why, wl, "resolve %s: no A record", name);
    return -1;
}

/* GET / from host:port into body; the HTTP status to answer with. */
static int peer(const char *host, int port, char *body, size_t bl) {
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)port);
    if (resolve(host, &sa.sin_addr, body, bl) != 0) return 502;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct timeval tv = {3, 0};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) != 0) {
        snprintf(body, bl, "connect %s:%d: %s", inet_ntoa(sa.sin_addr), port, strerror(errno));
        close(s);
        return 502;
    }
    static const char get[] = "GET / HTTP/1.0\r\n\r\n";
    write(s, get, sizeof get - 1);
    char buf[2048];
    size_t got = 0;
    ssize_t r;
    while (got < sizeof buf - 1 && (r = read(s, buf + got, sizeof buf - 1 - got)) > 0)
        got += (size_t)r;
    close(s);
    buf[got] = 0;
    char *start = strstr(buf, "\r\n\r\n");
    const char *from = start ? start + 4 : buf;
    size_t len = strlen(from) < bl - 1 ? strlen(from) : bl - 1;
    memcpy(body, from, len);
    body[len] = 0;
    return start ? 200 : 502;
}

int main(void) {
    const char *p = getenv("PORT");
    if (!p) p = getenv("PORT_HTTP");
    int port = p ? atoi(p) : 8080;
    const char *message = getenv("MESSAGE");
    if (!message) message = "mcp";
    if (getenv("IGNORE_SIGTERM")) signal(SIGTERM, SIG_IGN);
    else signal(SIGTERM, on_term);
    const char *ea = getenv("EXIT_AFTER");
    if (ea) { signal(SIGALRM, on_alarm); alarm((unsigned)atoi(ea)); }
    setvbuf(stdout, NULL, _IOLBF, 0);
    int quiet = getenv("QUIET") != NULL;

    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 64) < 0) {
        perror("hello: bind/listen");
        return 1;
    }
    printf("hello: listening on :%d\n", port);
    char body[512], resp[2048], req[2048];
    int blen = snprintf(body, sizeof body, "hello from %s\n", message);
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) continue;
        ssize_t n = read(c, req, sizeof req - 1);
        if (n > 0) {
            req[n] = 0;
            char *eol = strpbrk(req, "\r\n");
            if (eol) *eol = 0;
            if (!quiet) printf("hello: %s\n", req);
        }
        char host[256], fetched[1024];
        int pport = 0, status = 200, flen = blen;
        const char *out = body;
        if (n > 0 && sscanf(req, "GET /get/%255[^/ ]/%d", host, &pport) == 2) {
            status = peer(host, pport, fetched, sizeof fetched);
            if (status != 200) strncat(fetched, "\n", sizeof fetched - strlen(fetched) - 1);
            out = fetched;
            flen = (int)strlen(fetched);
        }
        int rlen = snprintf(resp, sizeof resp,
                            "HTTP/1.0 %d %s\r\nContent-Type: text/plain\r\n"
                            "Content-Length: %d\r\nConnection: close\r\n\r\n%s",
                            status, status == 200 ? "OK" : "Bad Gateway", flen, out);
        write(c, resp, (size_t)rlen);
        close(c);
    }
}
