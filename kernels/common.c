// kernels/common.c: error table, fatal checks, logging and number parsing.
#define _POSIX_C_SOURCE 200809L
#include "kernels/common.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <string.h>
#include <time.h>

static const char *const error_names[] = {
#define MT_X_NAME(name, msg) #name,
    MT_ERROR_TABLE(MT_X_NAME)
#undef MT_X_NAME
};
static const char *const error_messages[] = {
#define MT_X_MSG(name, msg) msg,
    MT_ERROR_TABLE(MT_X_MSG)
#undef MT_X_MSG
};

const char *mt_err_name(mt_err err) { return (err >= 0 && err < MT_ERR_COUNT) ? error_names[err] : "MT_ERR_UNKNOWN"; }

const char *mt_err_message(mt_err err) {
    return (err >= 0 && err < MT_ERR_COUNT) ? error_messages[err] : "unknown error";
}

static _Thread_local char last_error[2048];

mt_err mt_errorf(mt_err err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return err;
}

const char *mt_last_error(void) { return last_error; }
void mt_clear_error(void) { last_error[0] = '\0'; }

void mt_fatal(const char *file, int line, const char *fmt, ...) {
    fprintf(stderr, "memtune: fatal at %s:%d: ", file, line);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
    abort();
}

void mt_check_failed(const char *file, int line, const char *cond, const char *fmt, ...) {
    fprintf(stderr, "memtune: fatal at %s:%d: check failed: %s: ", file, line, cond);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
    abort();
}

static int log_level = -1;

void mt_log_set_level(mt_log_level level) { log_level = (int)level; }

void mt_log(mt_log_level level, const char *fmt, ...) {
    if (log_level < 0) {
        const char *env = getenv("MT_LOG_LEVEL");
        log_level = env ? atoi(env) : MT_LOG_INFO;
    }
    if ((int)level < log_level) return;
    static const char *const prefix[] = {"debug: ", "", "warning: ", "error: "};
    // the whole line in one write: the ranks of a data-parallel run share
    // their terminal or log file, and pieces written apart interleave
    char line[2048], *text = line;
    size_t head = strlen(prefix[level]);
    memcpy(line, prefix[level], head);
    va_list ap, again;
    va_start(ap, fmt);
    va_copy(again, ap);
    int n = vsnprintf(line + head, sizeof line - head - 1, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if (head + (size_t)n + 2 > sizeof line) {  // longer than the buffer: format it again into one that fits
        text = malloc(head + (size_t)n + 2);
        if (text) {
            memcpy(text, prefix[level], head);
            vsnprintf(text + head, (size_t)n + 1, fmt, again);
        } else {  // (out of memory: the line cut at the buffer's end)
            text = line;
            n = (int)(sizeof line - head - 2);
        }
    }
    va_end(again);
    size_t len = head + (size_t)n;
    text[len] = '\n';
    fwrite(text, 1, len + 1, stderr);
    if (text != line) free(text);
}

double mt_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int mt_parse_long(const char *s, long lo, long hi, long *out) {
    if (!s || !*s) return -1;
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end != '\0' || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

int mt_parse_double(const char *s, double lo, double hi, double *out) {
    if (!s || !*s) return -1;
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end != '\0' || !isfinite(v) || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}
