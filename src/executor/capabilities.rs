//! Capabilities: the spec's five sets (bounding, effective, permitted,
//! inheritable, ambient) resolved in the parent and applied in the child in
//! two steps around the uid switch: the bounding set is dropped while the
//! process still has CAP_SETPCAP, the other sets are set after `setresuid`
//! (which, with keep-caps, leaves only the permitted set).

use std::str::FromStr;

use caps::{CapSet, Capability, CapsHashSet};
use oci_spec::runtime::LinuxCapabilities;

#[derive(Debug, thiserror::Error)]
pub enum CapabilityError {
    #[error("drop capability {cap} from the bounding set: {reason}")]
    DropBounding { cap: Capability, reason: String },
    #[error("set {set} capabilities: {reason}")]
    Set { set: &'static str, reason: String },
    #[error("raise ambient capability {cap}: {reason}")]
    RaiseAmbient { cap: Capability, reason: String },
}

/// The five sets, as the `caps` crate names them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapabilityPlan {
    pub bounding: CapsHashSet,
    pub effective: CapsHashSet,
    pub permitted: CapsHashSet,
    pub inheritable: CapsHashSet,
    pub ambient: CapsHashSet,
    /// What this kernel knows (probed in the parent).
    pub supported: CapsHashSet,
}

fn convert(
    set: Option<&oci_spec::runtime::Capabilities>,
    which: &str,
    supported: &CapsHashSet,
) -> CapsHashSet {
    let mut out = CapsHashSet::new();
    for cap in set.into_iter().flatten() {
        let name = cap.to_string();
        let name = if name.starts_with("CAP_") {
            name
        } else {
            format!("CAP_{name}")
        };
        match Capability::from_str(&name) {
            Ok(c) if supported.contains(&c) => {
                out.insert(c);
            }
            _ => {
                tracing::warn!(capability = %name, set = which, "capability unknown to this kernel, skipped")
            }
        }
    }
    out
}

impl CapabilityPlan {
    /// Resolves the spec's sets; capabilities this kernel lacks are skipped
    /// with a warning, as runc does.
    pub fn from_spec(spec: Option<&LinuxCapabilities>) -> CapabilityPlan {
        let Some(spec) = spec else {
            return CapabilityPlan::default();
        };
        let supported = caps::runtime::thread_all_supported();
        CapabilityPlan {
            bounding: convert(spec.bounding().as_ref(), "bounding", &supported),
            effective: convert(spec.effective().as_ref(), "effective", &supported),
            permitted: convert(spec.permitted().as_ref(), "permitted", &supported),
            inheritable: convert(spec.inheritable().as_ref(), "inheritable", &supported),
            ambient: convert(spec.ambient().as_ref(), "ambient", &supported),
            supported,
        }
    }

    /// Drops every capability outside the bounding set. Call before the uid
    /// switch (needs CAP_SETPCAP).
    pub fn apply_bounding(&self) -> Result<(), CapabilityError> {
        for cap in &self.supported {
            let cap = *cap;
            if self.bounding.contains(&cap) {
                continue;
            }
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| CapabilityError::DropBounding {
                cap,
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Sets effective, permitted, inheritable and raises the ambient set.
    /// Call after the uid switch.
    pub fn apply_sets(&self) -> Result<(), CapabilityError> {
        // Order matters: the permitted set bounds the others, and lowering it
        // first would make raising effective ones fail; set inheritable and
        // permitted (with effective cleared), then effective.
        let set = |which: CapSet, name: &'static str, value: &CapsHashSet| {
            caps::set(None, which, value).map_err(|e| CapabilityError::Set {
                set: name,
                reason: e.to_string(),
            })
        };
        set(CapSet::Effective, "effective", &CapsHashSet::new())?;
        set(CapSet::Inheritable, "inheritable", &self.inheritable)?;
        set(CapSet::Permitted, "permitted", &self.permitted)?;
        set(CapSet::Effective, "effective", &self.effective)?;
        caps::clear(None, CapSet::Ambient).map_err(|e| CapabilityError::Set {
            set: "ambient",
            reason: e.to_string(),
        })?;
        for cap in &self.ambient {
            caps::raise(None, CapSet::Ambient, *cap).map_err(|e| {
                CapabilityError::RaiseAmbient {
                    cap: *cap,
                    reason: e.to_string(),
                }
            })?;
        }
        Ok(())
    }
}
