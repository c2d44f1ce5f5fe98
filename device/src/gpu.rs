// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The emulated GPU's state that outlives vhost-user connections: identity, config space and
//! statistics. (Engines, MMU, contexts and queues of events/completions join it in later
//! steps; a connection only borrows it.)

use svmgpu_spec::{Config, CONFIG_SIZE};
use thiserror::Error;

use crate::config::{read_config, DeviceOptions, OptionsError};
use crate::stats::Stats;

/// Errors creating a GPU.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GpuError {
    /// Invalid options.
    #[error("invalid device options: {0}")]
    Options(#[from] OptionsError),
}

/// One emulated svmgpu device.
#[derive(Debug)]
pub struct Gpu {
    index: u32,
    options: DeviceOptions,
    config: Config,
    config_bytes: [u8; CONFIG_SIZE],
    stats: Stats,
}

impl Gpu {
    /// A device with socket index `index`.
    pub fn new(index: u32, options: &DeviceOptions) -> Result<Self, GpuError> {
        options.validate()?;
        let config = options.config_space(index);
        Ok(Self {
            index,
            options: options.clone(),
            config,
            config_bytes: config.to_bytes(),
            stats: Stats::new(),
        })
    }

    /// Socket index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Options it was created with.
    pub fn options(&self) -> &DeviceOptions {
        &self.options
    }

    /// Config space.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Config space bytes.
    pub fn config_bytes(&self) -> &[u8; CONFIG_SIZE] {
        &self.config_bytes
    }

    /// A vhost-user GET_CONFIG answer: exactly `size` bytes.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config(&self.config_bytes, offset, size)
    }

    /// Statistics.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_validates() {
        let bad = DeviceOptions {
            tlb_ways: 3,
            ..Default::default()
        };
        assert!(matches!(Gpu::new(0, &bad), Err(GpuError::Options(_))));
        let g = Gpu::new(2, &DeviceOptions::default()).unwrap();
        assert_eq!(g.index(), 2);
        assert_eq!(g.config().device_index, 2);
        assert_eq!(g.read_config(8, 4), vec![2, 0, 0, 0]);
    }
}
