// trainer/fsutil.c: see fsutil.h.
#define _POSIX_C_SOURCE 200809L
#include "trainer/fsutil.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

mt_err mt_make_dirs(const char *path) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1;; p++) {
        char c = *p;
        if (c != '/' && c != '\0') continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return mt_errorf(MT_ERR_IO, "%s: cannot create the folder (%s); set output.dir to a writable place", buf,
                             strerror(errno));
        *p = c;
        if (c == '\0') break;
    }
    return MT_OK;
}

void mt_remove_tree(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) != 0) return;
    if (S_ISDIR(sb.st_mode)) {
        DIR *d = opendir(path);
        if (d) {
            struct dirent *e;
            char child[2048];
            while ((e = readdir(d))) {
                if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
                snprintf(child, sizeof child, "%s/%s", path, e->d_name);
                mt_remove_tree(child);
            }
            closedir(d);
        }
        rmdir(path);
    } else {
        unlink(path);
    }
}

int mt_fsync_path(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) buf[n] = '\0', *len = (size_t)n;
    return buf;
}

cJSON *mt_read_json(const char *path, mt_err *err) {
    size_t len = 0;
    char *text = read_file(path, &len);
    if (!text) {
        *err = mt_errorf(MT_ERR_IO, "%s: cannot read (%s)", path, strerror(errno));
        return NULL;
    }
    cJSON *j = cJSON_ParseWithLength(text, len);
    free(text);
    if (!j) *err = mt_errorf(MT_ERR_FORMAT, "%s: not valid JSON", path);
    return j;
}

mt_err mt_write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) return mt_errorf(MT_ERR_IO, "%s: cannot create (%s)", path, strerror(errno));
    int ok = fputs(text, f) >= 0 && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = fclose(f) == 0 && ok;
    return ok ? MT_OK : mt_errorf(MT_ERR_IO, "%s: write failed (disk full?)", path);
}

mt_err mt_dir_stage(const char *dir, char *tmp, size_t len) {
    snprintf(tmp, len, "%s.tmp.%d", dir, (int)getpid());
    mt_remove_tree(tmp);
    if (mkdir(tmp, 0755) != 0) return mt_errorf(MT_ERR_IO, "%s: cannot create (%s)", tmp, strerror(errno));
    return MT_OK;
}

mt_err mt_dir_publish(const char *tmp, const char *dir, mt_err err) {
    if (!err) {
        // swap the complete folder in; the old one is removed only afterwards
        char old[1200];
        snprintf(old, sizeof old, "%s.old.%d", dir, (int)getpid());
        int had_old = rename(dir, old) == 0;
        if (rename(tmp, dir) != 0) {
            err = mt_errorf(MT_ERR_IO, "%s: cannot move the finished folder into place (%s)", dir, strerror(errno));
            if (had_old) rename(old, dir);
        } else if (had_old) {
            mt_remove_tree(old);
        }
    }
    if (err) mt_remove_tree(tmp);
    return err;
}
