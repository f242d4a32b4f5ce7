// trainer/fsutil.h: the few filesystem operations that make writes safe:
// mkdir -p, recursive removal, and fsync of a file or a folder (so that a
// rename that publishes a finished file or folder survives a crash).
#ifndef MT_FSUTIL_H
#define MT_FSUTIL_H

#include "kernels/common.h"

#ifdef __cplusplus
extern "C" {
#endif

// Creates path and its parents (like mkdir -p).
mt_err mt_make_dirs(const char *path);
// Removes a file or a folder with everything under it; missing is fine.
void mt_remove_tree(const char *path);
// fsyncs a file or folder by path; returns 0 on success.
int mt_fsync_path(const char *path);

#ifdef __cplusplus
}
#endif
#endif
