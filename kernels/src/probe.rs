//! A probe of the machine's float32 FMA throughput, so benchmarks can state a GEMM's rate as a
//! fraction of what the cores can do at all (`cargo bench -p kernels -- fma_peak`).

/// Independent accumulator registers: twelve chains hide a 4-cycle FMA latency at up to three
/// FMAs per cycle, and fit AVX2's sixteen registers without spilling.
const CHAINS: usize = 12;

struct Fmas {
    iterations: usize,
    a: f32,
    b: f32,
}

impl pulp::WithSimd for Fmas {
    type Output = (f32, usize);

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) -> (f32, usize) {
        let (a, b) = (simd.splat_f32s(self.a), simd.splat_f32s(self.b));
        let mut acc: [S::f32s; CHAINS] = std::array::from_fn(|c| simd.splat_f32s(c as f32 * 1e-3));
        for _ in 0..self.iterations {
            for x in acc.iter_mut() {
                *x = simd.mul_add_e_f32s(*x, a, b);
            }
        }
        let lanes = size_of::<S::f32s>() / size_of::<f32>();
        let sum = acc.iter().map(|&x| simd.reduce_sum_f32s(x)).sum();
        (sum, 2 * CHAINS * lanes * self.iterations)
    }
}

/// Runs `iterations` rounds of independent float32 fused multiply-adds on registers (no memory
/// traffic), in the widest vectors this CPU has, on the calling thread, and returns the number
/// of floating-point operations done. Time it to get one core's peak rate.
pub fn fma_throughput(iterations: usize) -> usize {
    // Opaque operands so LLVM cannot fold the chains.
    let a = std::hint::black_box(0.999_999_9f32);
    let b = std::hint::black_box(1e-7f32);
    let (sum, flops) = pulp::Arch::new().dispatch(Fmas { iterations, a, b });
    std::hint::black_box(sum);
    flops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_counts_its_operations() {
        // Two operations per lane per chain per round, in vectors of 1 to 16 lanes.
        let per_round = fma_throughput(1);
        assert!((2 * CHAINS..=2 * CHAINS * 16).contains(&per_round), "{per_round}");
        assert_eq!(fma_throughput(10), 10 * per_round);
    }
}
