//! A mesh of named parallel axes over the world's ranks.
//!
//! Ranks are laid out row-major over the axes in the fixed order
//! `data, cfg, pipefusion, ring, ulysses, tensor` (outermost first; innermost first it is
//! xDiT's order: tensor, sequence, pipeline, cfg, data), so the innermost axes group
//! neighbouring ranks: tensor-parallel groups, the most talkative (two all-reduces per block),
//! are the closest of all (on one host, the fastest links); Ulysses groups are neighbours and
//! the ring runs across them (USP); PipeFusion stages pass one patch's activations per block
//! range; the cfg pair exchanges one noise prediction per step; data-parallel replicas share
//! nothing per step.

use std::fmt;

use crate::error::ParallelError;

/// A parallel axis of the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Axis {
    /// Data parallelism: replicas generating different requests, sharing nothing per step.
    Data,
    /// Classifier-free guidance: the two halves of the guidance batch on two rank groups.
    Cfg,
    /// PipeFusion stages.
    PipeFusion,
    /// Ring sequence parallelism.
    Ring,
    /// Ulysses sequence parallelism.
    Ulysses,
    /// Tensor parallelism.
    Tensor,
}

impl Axis {
    /// Every axis, outermost first (the layout order).
    pub const ALL: [Axis; 6] =
        [Axis::Data, Axis::Cfg, Axis::PipeFusion, Axis::Ring, Axis::Ulysses, Axis::Tensor];

    /// The axis's config name.
    pub fn name(self) -> &'static str {
        match self {
            Axis::Data => "data",
            Axis::Cfg => "cfg",
            Axis::PipeFusion => "pipefusion",
            Axis::Ring => "ring",
            Axis::Ulysses => "ulysses",
            Axis::Tensor => "tensor",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The number of axes.
pub const AXES: usize = Axis::ALL.len();

/// Degrees of every axis; their product is the world size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mesh {
    degrees: [usize; AXES],
}

impl Mesh {
    /// A mesh with the given degrees (unnamed axes have degree 1), checked against
    /// `world_size`.
    ///
    /// # Errors
    /// A degree of 0, an axis named twice, or degrees whose product is not `world_size`.
    pub fn new(world_size: usize, degrees: &[(Axis, usize)]) -> Result<Mesh, ParallelError> {
        let mut d = [1usize; AXES];
        let mut seen = [false; AXES];
        for &(axis, degree) in degrees {
            if seen[axis.index()] {
                return Err(ParallelError::Mesh(format!("axis `{axis}` is given twice")));
            }
            seen[axis.index()] = true;
            if degree == 0 {
                return Err(ParallelError::Mesh(format!("degree of axis `{axis}` must be ≥ 1")));
            }
            d[axis.index()] = degree;
        }
        let mesh = Mesh { degrees: d };
        if mesh.world_size() != world_size {
            return Err(ParallelError::Mesh(format!(
                "degrees {mesh} multiply to {} but the world has {world_size} ranks",
                mesh.world_size()
            )));
        }
        Ok(mesh)
    }

    /// A one-axis mesh: every rank on `axis`.
    pub fn single(axis: Axis, world_size: usize) -> Mesh {
        let mut degrees = [1; AXES];
        degrees[axis.index()] = world_size.max(1);
        Mesh { degrees }
    }

    /// The degree of `axis`.
    pub fn degree(&self, axis: Axis) -> usize {
        self.degrees[axis.index()]
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.degrees.iter().product()
    }

    /// The coordinates of `rank`, indexed like [`Axis::ALL`].
    pub fn coords(&self, rank: usize) -> [usize; AXES] {
        let mut c = [0; AXES];
        let mut r = rank;
        for i in (0..AXES).rev() {
            c[i] = r % self.degrees[i];
            r /= self.degrees[i];
        }
        c
    }

    /// The rank at `coords`.
    pub fn rank_of(&self, coords: [usize; AXES]) -> usize {
        coords.iter().zip(&self.degrees).fold(0, |acc, (&c, &d)| acc * d + c)
    }

    /// The coordinate of `rank` along `axis`.
    pub fn coord(&self, rank: usize, axis: Axis) -> usize {
        self.coords(rank)[axis.index()]
    }

    /// The ranks that share `rank`'s coordinates on every axis not in `axes`, in rank order
    /// (row-major over `axes`). `axes = []` gives `[rank]`; all axes give the world.
    pub fn group(&self, rank: usize, axes: &[Axis]) -> Vec<usize> {
        let base = self.coords(rank);
        (0..self.world_size())
            .filter(|&r| {
                let c = self.coords(r);
                (0..AXES).all(|i| axes.iter().any(|a| a.index() == i) || c[i] == base[i])
            })
            .collect()
    }
}

impl fmt::Display for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> =
            Axis::ALL.iter().map(|a| format!("{a}={}", self.degree(*a))).collect();
        write!(f, "[{}]", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulysses_groups_are_neighbours_and_ring_runs_across() {
        let m = Mesh::new(8, &[(Axis::Ulysses, 2), (Axis::Ring, 2), (Axis::Cfg, 2)]).unwrap();
        assert_eq!(m.group(0, &[Axis::Ulysses]), vec![0, 1]);
        assert_eq!(m.group(3, &[Axis::Ulysses]), vec![2, 3]);
        assert_eq!(m.group(1, &[Axis::Ring]), vec![1, 3]);
        assert_eq!(m.group(5, &[Axis::Cfg]), vec![1, 5]);
        // Data outermost: replicas are the farthest apart.
        let d = Mesh::new(8, &[(Axis::Data, 2), (Axis::Cfg, 2), (Axis::Tensor, 2)]).unwrap();
        assert_eq!(d.group(0, &[Axis::Tensor]), vec![0, 1]);
        assert_eq!(d.group(1, &[Axis::Cfg]), vec![1, 3]);
        assert_eq!(d.group(2, &[Axis::Data]), vec![2, 6]);
        assert_eq!(d.to_string(), "[data=2, cfg=2, pipefusion=1, ring=1, ulysses=1, tensor=2]");
        assert_eq!(m.group(6, &[Axis::Ring, Axis::Ulysses]), vec![4, 5, 6, 7]);
        for r in 0..8 {
            assert_eq!(m.rank_of(m.coords(r)), r);
        }
    }

    #[test]
    fn bad_meshes_are_rejected() {
        let e = Mesh::new(4, &[(Axis::Ulysses, 3)]).unwrap_err().to_string();
        assert!(e.contains("multiply to 3") && e.contains("4 ranks"), "{e}");
        assert!(Mesh::new(2, &[(Axis::Ring, 0)]).is_err());
        assert!(Mesh::new(4, &[(Axis::Ring, 2), (Axis::Ring, 2)]).is_err());
    }
}
