// optim/schedule.c: learning-rate schedules (schedule.h).
#include "optim/schedule.h"

#include <math.h>

float mt_schedule_lr(const mt_schedule *s, int step) {
    // warmup reaches lr at step warmup_steps - 1, as (step + 1) / warmup
    if (step < s->warmup_steps) return s->lr * (float)(step + 1) / (float)s->warmup_steps;
    float min_lr = s->lr * s->min_lr_ratio;
    int decay_steps = s->total_steps - s->warmup_steps;
    if (s->kind == MT_SCHEDULE_CONSTANT || decay_steps <= 1) return s->lr;
    float progress = (float)(step - s->warmup_steps) / (float)(decay_steps - 1);
    if (progress > 1.0f) progress = 1.0f;
    if (s->kind == MT_SCHEDULE_LINEAR) return s->lr + (min_lr - s->lr) * progress;
    return min_lr + 0.5f * (s->lr - min_lr) * (1.0f + cosf((float)M_PI * progress));
}
