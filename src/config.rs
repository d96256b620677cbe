//! TEMPORARY STUB (being replaced by the real config module).
use std::path::{Path, PathBuf};
use std::time::Duration;
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub backing: Option<PathBuf>,
    pub mountpoint: Option<PathBuf>,
    pub store: Option<PathBuf>,
    pub threads: usize,
    pub allow_other: Option<bool>,
    pub log_level: Option<String>,
    pub cache: CacheConfig,
    pub tracking: TrackingConfig,
    pub groups: Vec<GroupConfig>,
}
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub attr_timeout: Duration,
    pub entry_timeout: Duration,
}
#[derive(Debug, Clone, PartialEq)]
pub struct TrackingConfig {
    pub enabled: bool,
    pub block_size: u64,
    pub partition_size: u64,
    pub interval: Duration,
}
#[derive(Debug, Clone, PartialEq)]
pub struct GroupConfig {
    pub name: String,
    pub volumes: Vec<String>,
}
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("bad")]
    Invalid,
}
impl Default for Config {
    fn default() -> Self {
        Config {
            backing: None,
            mountpoint: None,
            store: None,
            threads: 2,
            allow_other: None,
            log_level: None,
            cache: CacheConfig {
                attr_timeout: Duration::from_secs(1),
                entry_timeout: Duration::from_secs(1),
            },
            tracking: TrackingConfig {
                enabled: true,
                block_size: 65536,
                partition_size: 64 << 20,
                interval: Duration::from_secs(10),
            },
            groups: vec![],
        }
    }
}
impl Config {
    pub fn load(_p: &Path) -> Result<Config, ConfigError> {
        Ok(Config::default())
    }
    pub fn store_dir(&self, backing: &Path) -> PathBuf {
        self.store
            .clone()
            .unwrap_or_else(|| backing.join(".grainfs"))
    }
}
