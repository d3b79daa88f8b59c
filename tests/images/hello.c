/* Tiny static HTTP server used as the test workload, in containers and VMs.
 *
 * Listens on $PORT (else $PORT_HTTP, else 8080) on all addresses and answers
 * every request with "hello from $MESSAGE\n". Logs to stdout. Test knobs:
 *   IGNORE_SIGTERM=1  ignore SIGTERM (an uncooperative guest)
 *   EXIT_AFTER=N      exit(1) after N seconds (a flapping workload)
 */
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

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
    char body[512], resp[1024], req[2048];
    int blen = snprintf(body, sizeof body, "hello from %s\n", message);
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) continue;
        ssize_t n = read(c, req, sizeof req - 1);
        if (n > 0) {
            req[n] = 0;
            char *eol = strpbrk(req, "\r\n");
            if (eol) *eol = 0;
            printf("hello: %s\n", req);
        }
        int rlen = snprintf(resp, sizeof resp,
                            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                            "Content-Length: %d\r\nConnection: close\r\n\r\n%s",
                            blen, body);
        write(c, resp, (size_t)rlen);
        close(c);
    }
}
