//! Host-side numerics that reproduce, bit for bit, what diffusers gets from torch (CPU) and
//! numpy when it builds its tables.
//!
//! Every function names the Python expression it stands for. The float32 ones were checked
//! against torch 2.x on the reference machine (every element of a 1000-entry table equal);
//! the float64 ones follow numpy's C code (`linspace`, `arange`'s fill rule, `interp`).

use crate::config::BetaSchedule;

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on CPU.
///
/// torch computes `step = (end - start) / (steps - 1)` in float32 and then fills the first half
/// from `start` and the second half from `end`, each element with one rounding
/// (`fma(step, i, start)` and `fma(-step, steps - 1 - i, end)`). A plain `start + step * i`
/// differs from torch in ~20% of the elements of a 1000-step beta table.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    match steps {
        0 => Vec::new(),
        1 => vec![start as f32],
        _ => {
            let (s, e) = (start as f32, end as f32);
            let step = (e - s) / (steps - 1) as f32;
            let half = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < half {
                        step.mul_add(i as f32, s)
                    } else {
                        (-step).mul_add((steps - 1 - i) as f32, e)
                    }
                })
                .collect()
        }
    }
}

/// `torch.cumprod(x, 0)` for float32 on CPU: the running product is kept in float64 (torch's
/// CPU accumulate type for float) and rounded to float32 at every output.
pub(crate) fn torch_cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    x.iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// `np.linspace(start, stop, num)` (float64, endpoint included).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let div = (num - 1) as f64;
            let delta = stop - start;
            let step = delta / div;
            let mut y: Vec<f64> = if step == 0.0 {
                (0..num).map(|i| (i as f64 / div) * delta + start).collect()
            } else {
                (0..num).map(|i| i as f64 * step + start).collect()
            };
            y[num - 1] = stop;
            y
        }
    }
}

/// `np.arange(start, stop, step)` for float64: `ceil((stop - start) / step)` elements; the first
/// two are `start` and `start + step`, the rest `start + i * delta` with
/// `delta = (start + step) - start` (numpy's fill rule).
pub(crate) fn np_arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let next = start + step;
    let delta = next - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => next,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)` (float64).
pub(crate) fn np_interp_arange(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    let last = (n - 1) as f64;
    if x > last {
        return fp[n - 1];
    }
    if x < 0.0 {
        return fp[0];
    }
    let j = x.floor() as usize;
    if j >= n - 1 || j as f64 == x {
        return fp[j.min(n - 1)];
    }
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    slope * (x - j as f64) + fp[j]
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32 (torch), the VP sigma of every
/// training timestep.
pub(crate) fn vp_sigmas_f32(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `alpha_t, sigma_t` of DPM-Solver's `_sigma_to_alpha_sigma_t` for a VP schedule, in float32:
/// `alpha_t = 1 / (sigma**2 + 1) ** 0.5`, `sigma_t = sigma * alpha_t`.
pub(crate) fn vp_alpha_sigma_f32(sigma: f32) -> (f32, f32) {
    let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha_t, sigma * alpha_t)
}

/// `betas_for_alpha_bar(n)` (the `"squaredcos_cap_v2"` schedule): computed in Python floats,
/// then `torch.tensor(..., dtype=torch.float32)`.
pub(crate) fn betas_for_alpha_bar_cosine(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// The training betas of a VP scheduler's `__init__`, then `alphas_cumprod =
/// torch.cumprod(1.0 - betas, 0)`, all float32 as in diffusers.
pub(crate) fn alphas_cumprod(
    num_train_timesteps: usize,
    beta_start: f64,
    beta_end: f64,
    beta_schedule: BetaSchedule,
    trained_betas: Option<&[f64]>,
) -> Vec<f32> {
    let betas: Vec<f32> = match (trained_betas, beta_schedule) {
        (Some(b), _) => b.iter().map(|&v| v as f32).collect(),
        (None, BetaSchedule::Linear) => {
            torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
        }
        (None, BetaSchedule::ScaledLinear) => {
            torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
        (None, BetaSchedule::SquaredcosCapV2) => betas_for_alpha_bar_cosine(num_train_timesteps),
    };
    let alphas: Vec<f32> = betas.iter().map(|&b| 1.0 - b).collect();
    torch_cumprod_f32(&alphas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_ends_and_symmetry() {
        let v = torch_linspace_f32(0.0001, 0.02, 1000);
        assert_eq!(v.len(), 1000);
        assert_eq!(v[0], 0.0001f32);
        assert_eq!(v[999], 0.02f32);
        assert_eq!(torch_linspace_f32(2.0, 3.0, 1), vec![2.0]);
    }

    #[test]
    fn numpy_helpers_match_numpy() {
        // np.linspace(0, 999, 21).round()[::-1][:-1].astype(int) from numpy 2.4.
        let t: Vec<i64> = np_linspace(0.0, 999.0, 21)
            .iter()
            .rev()
            .take(20)
            .map(|v| v.round_ties_even() as i64)
            .collect();
        assert_eq!(
            t,
            [
                999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350, 300, 250,
                200, 150, 100, 50
            ]
        );
        // np.arange(1000, 0, -1000/3) == [1000.0, 666.6666666666667, 333.3333333333335]
        assert_eq!(
            np_arange_f64(1000.0, 0.0, -1000.0 / 3.0),
            vec![1000.0, 666.6666666666667, 333.3333333333335]
        );
        // np.arange(1000, 0, -1000/30)[3] == 899.9999999999999
        assert_eq!(np_arange_f64(1000.0, 0.0, -1000.0 / 30.0)[3], 899.9999999999999);
        let fp = [1.0, 3.0, 7.0];
        assert_eq!(np_interp_arange(0.5, &fp), 2.0);
        assert_eq!(np_interp_arange(2.0, &fp), 7.0);
        assert_eq!(np_interp_arange(1.0, &fp), 3.0);
        assert_eq!(np_interp_arange(5.0, &fp), 7.0);
    }

    #[test]
    fn cumprod_accumulates_in_f64() {
        let x = [0.5f32, 0.25, 0.1];
        let c = torch_cumprod_f32(&x);
        assert_eq!(c, vec![0.5, 0.125, (0.125f64 * 0.1f32 as f64) as f32]);
    }
}
