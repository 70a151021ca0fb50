//! Where expert weights come from and where they live: sources (checkpoint shards, an
//! extraction, the seed layout), extraction and verification, the conversion to compute
//! tensors, native's resident experts and selective's cache — its weight storage, GPU slot
//! pools and copy paths. Implements the model's ports; the bookkeeping is the cache core's.

pub mod cache;
pub mod convert;
pub mod demote;
pub mod direct;
pub mod extract;
pub mod resident;
pub mod seed;
pub mod source;
pub mod upload;
pub mod verify;

use std::sync::Arc;

use crate::cache::settings::SourceSpec;
use crate::model::config::MoeConfig;
use crate::model::error::{ModelError, Result};
use source::ExpertSource;

/// Opens the expert source a spec names, for the model whose config is `cfg`.
pub fn open_source(
    spec: &SourceSpec,
    cfg: &MoeConfig,
    ckpt: Option<&crate::model::Checkpoint>,
) -> Result<Arc<dyn ExpertSource>> {
    match spec {
        SourceSpec::Shards => {
            let ckpt = ckpt.ok_or_else(|| {
                ModelError::Input("the shards source needs the model checkpoint".into())
            })?;
            Ok(Arc::new(source::ShardSource::new(ckpt, cfg)?))
        }
        SourceSpec::Extracted(dir) => Ok(Arc::new(extract::ExtractedSource::open(dir, cfg)?)),
        SourceSpec::SeedLayout(dir) => Ok(Arc::new(seed::SeedExpertSource::open(dir, cfg)?)),
    }
}
