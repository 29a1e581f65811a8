//! AdamW (Loshchilov and Hutter, 2019) as `torch.optim.AdamW` computes it, gradient-norm
//! clipping as `torch.nn.utils.clip_grad_norm_`, the learning-rate schedule and the
//! exponential moving average of the weights of `tools/digits/train.py`.

use crate::error::{Error, Result};

/// AdamW's settings (PyTorch's defaults but the learning rate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// The peak learning rate (the schedule's base; [`AdamW::step`] takes the rate of the
    /// step).
    pub lr: f64,
    /// The decay rates of the first and second moments.
    pub betas: (f64, f64),
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies the weights by `1 - lr * weight_decay`.
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One parameter tensor's moments and step count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdamWState {
    /// The first moment (`exp_avg`).
    pub exp_avg: Vec<f32>,
    /// The second moment (`exp_avg_sq`).
    pub exp_avg_sq: Vec<f32>,
    /// Steps taken.
    pub step: u64,
}

impl AdamW {
    /// One step on `param` with its gradient `grad` at learning rate `lr` (the schedule's),
    /// as PyTorch's single-tensor AdamW: `p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v +
    /// (1 - b2) g^2; p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
    ///
    /// # Errors
    /// [`Error::Shape`] for a gradient or moments of another length than `param`.
    pub fn step(
        &self,
        lr: f64,
        param: &mut [f32],
        grad: &[f32],
        state: &mut AdamWState,
    ) -> Result<()> {
        if grad.len() != param.len() || (state.step > 0 && state.exp_avg.len() != param.len()) {
            return Err(Error::Shape {
                op: "AdamW::step",
                expected: format!("a gradient and moments of {} values", param.len()),
                found: format!("{} and {}", grad.len(), state.exp_avg.len()),
            });
        }
        if state.exp_avg.len() != param.len() {
            state.exp_avg = vec![0.0; param.len()];
            state.exp_avg_sq = vec![0.0; param.len()];
        }
        state.step += 1;
        let t = state.step as i32;
        let (b1, b2) = self.betas;
        let bias1 = 1.0 - b1.powi(t);
        let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let step_size = (lr / bias1) as f32;
        let decay = (1.0 - lr * self.weight_decay) as f32;
        // 1 - beta rounded once from f64, as PyTorch passes it to its kernels.
        let (b1f, b2f) = (b1 as f32, b2 as f32);
        let (one_b1, one_b2) = ((1.0 - b1) as f32, (1.0 - b2) as f32);
        for (((p, &g), m), v) in param
            .iter_mut()
            .zip(grad)
            .zip(state.exp_avg.iter_mut())
            .zip(state.exp_avg_sq.iter_mut())
        {
            *p *= decay;
            *m = *m * b1f + one_b1 * g;
            *v = *v * b2f + one_b2 * g * g;
            let denom = v.sqrt() / bias2_sqrt as f32 + self.eps as f32;
            *p -= step_size * *m / denom;
        }
        Ok(())
    }
}

/// Scales every gradient by `min(1, max_norm / (total + 1e-6))`, `total` being the L2 norm
/// of all of them together, and returns `total` (`torch.nn.utils.clip_grad_norm_`).
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let total = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    let coef = (max_norm / (total + 1e-6)).min(1.0) as f32;
    for g in grads.iter_mut() {
        for v in g.iter_mut() {
            *v *= coef;
        }
    }
    total
}

/// The learning rate of `tools/digits/train.py` at optimiser step `step` (from 0): a linear
/// warm-up to `base` over `warmup` steps, `base * (step + 1) / warmup`, then a cosine decay
/// to 0 at `total`. (diffusers' `get_cosine_schedule_with_warmup` is the same after the
/// warm-up; during it, it is one step behind.)
pub fn warmup_cosine_lr(step: usize, warmup: usize, total: usize, base: f64) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / span;
    base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The EMA decay of `tools/digits/train.py` after optimiser step `k` (from 1):
/// `min(max_decay, (1 + k) / (10 + k))`.
pub fn ema_decay(k: u64, max_decay: f64) -> f64 {
    ((1 + k) as f64 / (10 + k) as f64).min(max_decay)
}

/// Moves `shadow` towards `param`: `shadow += (1 - decay) (param - shadow)` (PyTorch's
/// `lerp_`).
pub fn ema_update(shadow: &mut [f32], param: &[f32], decay: f64) {
    let w = (1.0 - decay) as f32;
    for (s, &p) in shadow.iter_mut().zip(param) {
        *s += w * (p - *s);
    }
}
