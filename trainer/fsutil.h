// trainer/fsutil.h: the few filesystem operations that make writes safe:
// mkdir -p, recursive removal, fsync of a file or a folder (so that a rename
// that publishes a finished file or folder survives a crash), folders built
// under a temporary name and published by rename, and JSON/text files.
#ifndef MT_FSUTIL_H
#define MT_FSUTIL_H

#include <cjson/cJSON.h>
#include <stddef.h>

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
// Parses a JSON file; NULL with *err set (naming the file) on failure.
cJSON *mt_read_json(const char *path, mt_err *err);
// Writes text to path and fsyncs it.
mt_err mt_write_text(const char *path, const char *text);
// A folder is written under a temporary name beside `dir` (mt_dir_stage
// creates it, empty, and names it in tmp), then mt_dir_publish renames it over
// `dir` if err is MT_OK (the old folder goes only once the new one is in
// place) or removes it otherwise; it returns the outcome.
mt_err mt_dir_stage(const char *dir, char *tmp, size_t len);
mt_err mt_dir_publish(const char *tmp, const char *dir, mt_err err);

#ifdef __cplusplus
}
#endif
#endif
