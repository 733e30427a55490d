/* Cost of one refused TCP connect on loopback: a new socket each time (socket, connect,
 * SO_ERROR, close) against one socket reused after connect(AF_UNSPEC), as workersd's
 * spare sockets do. Port 1 on 127.0.0.2 must be closed.
 *   gcc -O2 -o /tmp/refused_connect testing/bench/refused_connect.c && /tmp/refused_connect */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

static double sys_us(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_stime.tv_sec * 1e6 + ru.ru_stime.tv_usec + ru.ru_utime.tv_sec * 1e6 +
           ru.ru_utime.tv_usec;
}

static int refused(int s, const struct sockaddr_in *to) {
    connect(s, (const struct sockaddr *)to, sizeof *to);
    int error = 0;
    socklen_t len = sizeof error;
    getsockopt(s, SOL_SOCKET, SO_ERROR, &error, &len);
    return error != 0;
}

int main(void) {
    enum { N = 100000 };
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(1)};
    inet_pton(AF_INET, "127.0.0.2", &to.sin_addr);
    int failed = 0;
    double t0 = sys_us();
    for (int i = 0; i < N; i++) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        failed += refused(s, &to);
        close(s);
    }
    double fresh = (sys_us() - t0) / N;
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr unspec = {.sa_family = AF_UNSPEC};
    t0 = sys_us();
    for (int i = 0; i < N; i++) {
        failed += refused(s, &to);
        connect(s, &unspec, sizeof unspec);
    }
    double reused = (sys_us() - t0) / N;
    printf("CPU per refused connect: new socket %.1f us, reused socket %.1f us (%d of %d refused)\n",
           fresh, reused, failed, 2 * N);
    return failed == 2 * N ? 0 : 1;
}
