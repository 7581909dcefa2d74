/* netrr: a tiny TCP request/response benchmark (1-byte ping-pong), built static by
 * tests/testbox/bench_net.py and run in the test box's L1 and in the L2 guest (not part of the
 * default guest's initramfs: the benchmark ships it at run time).
 *
 *   netrr server PORT
 *   netrr client HOST PORT SECONDS
 *
 * server: listens on PORT (all IPv4 addresses, SO_REUSEADDR) and serves one connection at a time,
 * forever: every byte it reads is written straight back. It prints "NETRR-SERVER port=PORT" once
 * it listens.
 * client: connects to HOST:PORT (an IPv4 address), sets TCP_NODELAY, then for SECONDS sends one
 * byte and waits for the one byte echoed back, again and again (one transaction in flight: the
 * rate is the inverse of the round-trip time through both network stacks and everything between).
 * Both ends set TCP_NODELAY, so no Nagle or delayed-ACK timer ever holds a byte back.
 *
 * Output of the client, one line on stdout:
 *   NETRR trans=N secs=S tps=X lat_us=L
 * (tps: transactions per second; lat_us: mean round trip in microseconds.)
 * Errors: a line "netrr: ..." on stderr and exit status 1 (2 for bad usage).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void usage(void) {
  fprintf(stderr, "usage: netrr server PORT | netrr client HOST PORT SECONDS\n");
  exit(2);
}

static int port_of(const char *s) {
  char *end;
  long p = strtol(s, &end, 10);
  if (*end || p <= 0 || p > 65535) {
    fprintf(stderr, "netrr: bad port %s\n", s);
    exit(2);
  }
  return (int)p;
}

static void nodelay(int fd) {
  int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) {
    fprintf(stderr, "netrr: TCP_NODELAY: %s\n", strerror(errno));
    exit(1);
  }
}

static int server(int port) {
  int one = 1, ls = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                          .sin_addr.s_addr = htonl(INADDR_ANY)};
  if (ls < 0 || setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
      bind(ls, (struct sockaddr *)&a, sizeof a) != 0 || listen(ls, 4) != 0) {
    fprintf(stderr, "netrr: listen on port %d: %s\n", port, strerror(errno));
    return 1;
  }
  signal(SIGPIPE, SIG_IGN);
  printf("NETRR-SERVER port=%d\n", port);
  fflush(stdout);
  for (;;) {
    int fd = accept(ls, NULL, NULL);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      fprintf(stderr, "netrr: accept: %s\n", strerror(errno));
      return 1;
    }
    nodelay(fd);
    char buf[4096];
    for (;;) {
      ssize_t n = read(fd, buf, sizeof buf);
      if (n <= 0) break;   /* the client is done (or gone): serve the next one */
      if (write(fd, buf, (size_t)n) != n) break;
    }
    close(fd);
  }
}

static int client(const char *host, int port, double secs) {
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
    fprintf(stderr, "netrr: bad IPv4 address %s\n", host);
    return 2;
  }
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    fprintf(stderr, "netrr: connect to %s:%d: %s\n", host, port, strerror(errno));
    return 1;
  }
  nodelay(fd);
  unsigned long long trans = 0;
  char c = 'x';
  double t0 = now(), t = t0, stop = t0 + secs;
  while (t < stop) {
    if (write(fd, &c, 1) != 1) {
      fprintf(stderr, "netrr: write: %s\n", strerror(errno));
      return 1;
    }
    ssize_t n;
    do n = read(fd, &c, 1); while (n < 0 && errno == EINTR);
    if (n != 1) {
      fprintf(stderr, "netrr: read: %s\n", n < 0 ? strerror(errno) : "connection closed");
      return 1;
    }
    trans++;
    t = now();
  }
  double el = t - t0;
  close(fd);
  printf("NETRR trans=%llu secs=%.3f tps=%.1f lat_us=%.1f\n", trans, el, trans / el,
         trans ? el * 1e6 / trans : 0.0);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 3 && !strcmp(argv[1], "server")) return server(port_of(argv[2]));
  if (argc == 5 && !strcmp(argv[1], "client")) {
    char *end;
    double secs = strtod(argv[4], &end);
    if (*end || !(secs > 0)) {
      fprintf(stderr, "netrr: bad duration %s\n", argv[4]);
      return 2;
    }
    return client(argv[2], port_of(argv[3]), secs);
  }
  usage();
  return 2;
}
