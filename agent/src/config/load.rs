//! Loading: the layers (defaults → main file → `conf.d/*.toml` → command line), each file
//! checked on its own before they are merged.

use std::fs;
use std::path::{Path, PathBuf};

use super::{Config, ConfigError, LogFormat, Mode};

/// Largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Command-line overrides: the last layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--mode`.
    pub mode: Option<Mode>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--release-on-exit`.
    pub release_on_exit: bool,
}

/// A loaded configuration and the files it came from, in order.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The effective configuration.
    pub config: Config,
    /// Files read, in layer order.
    pub sources: Vec<PathBuf>,
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let io = |source| ConfigError::Io { path: path.to_owned(), source };
    let mut text = String::new();
    fs::File::open(path).map_err(io)?.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text).map_err(io)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::Parse { path: path.to_owned(), message: "larger than 1 MiB".into() });
    }
    Ok(text)
}

/// Parses one layer: checked against the schema on its own (so errors carry this file's
/// line numbers), and returned as a table for merging.
fn parse_layer(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = read_file(path)?;
    let parse_err = |e: toml::de::Error| ConfigError::Parse { path: path.to_owned(), message: e.to_string() };
    toml::from_str::<Config>(&text).map_err(parse_err)?;
    toml::from_str::<toml::Table>(&text).map_err(parse_err)
}

/// Recursively overlays `top` on `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Table, top: toml::Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// The `conf.d` directory that belongs to a main config file.
pub fn conf_d_dir(main: &Path) -> PathBuf {
    main.parent().unwrap_or(Path::new("/")).join("conf.d")
}

/// Loads the layered configuration rooted at `main` and applies `overrides`.
pub fn load(main: &Path, overrides: &Overrides) -> Result<Loaded, ConfigError> {
    let mut sources = vec![main.to_owned()];
    let mut merged = parse_layer(main)?;
    let conf_d = conf_d_dir(main);
    match fs::read_dir(&conf_d) {
        Ok(entries) => {
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            files.sort();
            for file in files {
                merge(&mut merged, parse_layer(&file)?);
                sources.push(file);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ConfigError::Io { path: conf_d, source }),
    }
    let mut config: Config = toml::Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Parse { path: main.to_owned(), message: e.to_string() })?;
    if let Some(mode) = overrides.mode {
        config.mode = mode;
    }
    if let Some(dir) = &overrides.state_dir {
        config.state_dir = dir.clone();
    }
    if let Some(format) = overrides.log_format {
        config.log.format = format;
    }
    config.enforcement.release_on_exit |= overrides.release_on_exit;
    config.validate()?;
    Ok(Loaded { config, sources })
}
