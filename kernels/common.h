// kernels/common.h: the base every module stands on. Owns the error codes
// (one X-macro table that makes their names and messages), the fatal checks
// for programmer errors, the user-facing error message buffer and logging.
#ifndef MT_COMMON_H
#define MT_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef __cplusplus
extern "C" {
#endif

// User-facing failures travel up to main as one of these codes; the detailed
// message (what was expected, what was found, what to do) is kept by
// mt_errorf() and printed once by main.
#define MT_ERROR_TABLE(X)                              \
    X(MT_OK, "ok")                                     \
    X(MT_ERR_IO, "file could not be read or written")  \
    X(MT_ERR_CONFIG, "invalid configuration")          \
    X(MT_ERR_MODEL, "invalid or unsupported model")    \
    X(MT_ERR_DATASET, "invalid dataset")               \
    X(MT_ERR_FORMAT, "malformed file")                 \
    X(MT_ERR_NOMEM, "out of memory")                   \
    X(MT_ERR_USAGE, "invalid command line")            \
    X(MT_ERR_NONFINITE, "non-finite loss or gradient") \
    X(MT_ERR_DEVICE, "GPU unavailable or failed")

// The X-macro expansion confuses clang-format's indentation here.
// clang-format off
typedef enum {
#define MT_X_ENUM(name, msg) name,
    MT_ERROR_TABLE(MT_X_ENUM)
#undef MT_X_ENUM
    MT_ERR_COUNT
} mt_err;
// clang-format on

const char *mt_err_name(mt_err err);
const char *mt_err_message(mt_err err);

// Records a detailed message for the error and returns the code, so that a
// failing function can say `return mt_errorf(MT_ERR_IO, "...", ...)`.
mt_err mt_errorf(mt_err err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
// The message recorded by the last mt_errorf (empty if none).
const char *mt_last_error(void);
void mt_clear_error(void);

// fp32 values read a range at a time where no whole host array of them
// exists (a checkpoint written straight from the offload store): read puts
// values [offset, offset + count) into dst.
typedef struct {
    mt_err (*read)(void *ctx, size_t offset, size_t count, float *dst);
    void *ctx;
} mt_f32_source;

// Fatal check for programmer errors: prints the condition, file:line and the
// message, then aborts. Stays in release builds, unlike assert().
void mt_fatal(const char *file, int line, const char *fmt, ...) __attribute__((noreturn, format(printf, 3, 4)));
void mt_check_failed(const char *file, int line, const char *cond, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 4, 5)));
#define MT_CHECK(cond, ...)                                                   \
    do {                                                                      \
        if (!(cond)) mt_check_failed(__FILE__, __LINE__, #cond, __VA_ARGS__); \
    } while (0)

// Logging to stderr with a level; MT_LOG_LEVEL env or mt_log_set_level.
typedef enum { MT_LOG_DEBUG, MT_LOG_INFO, MT_LOG_WARN, MT_LOG_ERROR } mt_log_level;
void mt_log_set_level(mt_log_level level);
void mt_log(mt_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define mt_info(...) mt_log(MT_LOG_INFO, __VA_ARGS__)
#define mt_warn(...) mt_log(MT_LOG_WARN, __VA_ARGS__)
#define mt_debug(...) mt_log(MT_LOG_DEBUG, __VA_ARGS__)

// Wall clock in seconds (monotonic).
double mt_now(void);

// Number parsing with end-pointer and range checks; return 0 on success.
int mt_parse_long(const char *s, long lo, long hi, long *out);
int mt_parse_double(const char *s, double lo, double hi, double *out);

#ifdef __cplusplus
}
#endif
#endif
