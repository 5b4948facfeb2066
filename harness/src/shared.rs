//! One copy of replicated weights per process: in-process ranks that load the same part of a
//! transformer onto the same device share it.
//!
//! Sequence-parallel, DistriFusion and naive-patch ranks all load the whole model; tensor
//! parallel ranks load different shards and PipeFusion stages different blocks. A
//! [`SharedModels`] (one per launch, dropped with it; no global state) hands every rank whose
//! [`LoadPlan`] and device equal an earlier rank's a clone of that rank's model. A Burn module
//! clone shares its tensors' storage (on the CPU, `Arc`ed bytes), so N ranks of a replicating
//! strategy hold the model once instead of N times. Ranks with different plans load in
//! parallel; ranks with the same plan wait for the first.

use std::sync::{Arc, Mutex, PoisonError};

use burn::tensor::backend::Backend;
use parallel_core::LoadPlan;

use crate::model::AnyDenoiser;

type Slot<B> = Arc<Mutex<Option<AnyDenoiser<B>>>>;

/// A loaded (or loading) model and the plan and device it was loaded for.
type Entry<B> = (LoadPlan, burn::tensor::Device<B>, Slot<B>);

/// Transformers loaded by the ranks of one launch, by (load plan, device).
pub struct SharedModels<B: Backend> {
    slots: Mutex<Vec<Entry<B>>>,
}

impl<B: Backend> Default for SharedModels<B> {
    fn default() -> Self {
        Self { slots: Mutex::new(Vec::new()) }
    }
}

impl<B: Backend> SharedModels<B> {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The model for `plan` on `device`: a clone of one already loaded, or `load()`'s result
    /// (kept for the ranks that ask next). A failed load is not kept: the next rank tries
    /// again and reports its own error.
    ///
    /// # Errors
    /// Whatever `load` returns.
    pub fn get_or_load<E>(
        &self,
        plan: &LoadPlan,
        device: &B::Device,
        load: impl FnOnce() -> Result<AnyDenoiser<B>, E>,
    ) -> Result<AnyDenoiser<B>, E> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            match slots.iter().find(|(p, d, _)| p == plan && d == device) {
                Some((_, _, slot)) => slot.clone(),
                None => {
                    let slot: Slot<B> = Arc::new(Mutex::new(None));
                    slots.push((plan.clone(), device.clone(), slot.clone()));
                    slot
                }
            }
        };
        let mut model = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = model.as_ref() {
            return Ok(m.clone());
        }
        let loaded = load()?;
        *model = Some(loaded.clone());
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend as B;
    use models_dit::DitModel;
    use parallel_core::Shard;

    #[test]
    fn equal_plans_share_storage_and_others_load_their_own() {
        let shared = SharedModels::<B>::new();
        let device = Default::default();
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/dit/pixart-alpha");
        let mut loads = 0;
        let mut get = |plan: &LoadPlan| {
            shared
                .get_or_load(plan, &device, || {
                    loads += 1;
                    DitModel::<B>::load(&dir, plan, &device).map(AnyDenoiser::Dit)
                })
                .expect("load")
        };
        let full = LoadPlan::full();
        let shard =
            LoadPlan { tensor_shard: Some(Shard { rank: 0, world: 2 }), ..LoadPlan::full() };
        let (a, b, c) = (get(&full), get(&full), get(&shard));
        assert_eq!(loads, 2, "the second full load must be served from the first");
        let first_weight = |m: &AnyDenoiser<B>| -> Vec<f32> {
            let AnyDenoiser::Dit(DitModel::PixArt(m)) = m else { unreachable!("a PixArt fixture") };
            m.transformer_blocks[0].attn1.to_q.weight.val().into_data().to_vec().expect("f32")
        };
        assert_eq!(first_weight(&a), first_weight(&b));
        assert_ne!(first_weight(&a).len(), first_weight(&c).len(), "a shard is its own load");
    }
}
