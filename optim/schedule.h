// optim/schedule.h: learning-rate schedules: linear warmup, then cosine,
// linear or constant decay to min_lr_ratio * lr at the last step.
#ifndef MT_SCHEDULE_H
#define MT_SCHEDULE_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { MT_SCHEDULE_COSINE, MT_SCHEDULE_LINEAR, MT_SCHEDULE_CONSTANT } mt_schedule_kind;

typedef struct {
    mt_schedule_kind kind;
    float lr, min_lr_ratio;
    int warmup_steps, total_steps;
} mt_schedule;

// Learning rate for optimizer step `step` (0-based).
float mt_schedule_lr(const mt_schedule *s, int step);

#ifdef __cplusplus
}
#endif
#endif
