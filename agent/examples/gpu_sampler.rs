//! The agent's GPU sampling pipeline on its own, for benchmarks: NVML backend on its thread →
//! sampler thread (attribution via /proc, FLOP estimate, 60 s windows) → bounded window
//! channel, drained here. Prints each window as a JSON line.
//!
//!   gpu_sampler --nvml-library PATH --seconds N [--interval-ms MS]

use std::sync::Arc;
use std::time::Duration;

use kycd::gpu::sampler::{self, GpuSampler, SamplerOptions, TenantMap};
use kycd::gpu::{NvmlBackend, NvmlOptions};

fn main() -> anyhow::Result<()> {
    let mut library = std::path::PathBuf::from(kycd::gpu::nvml::DEFAULT_LIBRARY);
    let (mut seconds, mut interval_ms) = (60u64, 1000u64);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"))?;
        match a.as_str() {
            "--nvml-library" => library = v.into(),
            "--seconds" => seconds = v.parse()?,
            "--interval-ms" => interval_ms = v.parse()?,
            _ => anyhow::bail!("unknown argument {a}"),
        }
    }
    let backend = NvmlBackend::start(NvmlOptions { library, ..Default::default() })?;
    // As the daemon samples: passed-through GPUs looked for in libvirt's status files and
    // this host's sysfs too (a rescan every 10 s).
    let options = SamplerOptions {
        interval: Duration::from_millis(interval_ms),
        passthrough: Some(kycd::gpu::passthrough::PassthroughOptions {
            libvirt_status_dir: "/run/libvirt/qemu".into(),
            sysfs_root: "/sys".into(),
            guest_timeout_ms: kycd::gpu::passthrough::DEFAULT_GUEST_TIMEOUT_MS,
        }),
        ..Default::default()
    };
    let sampler = GpuSampler::new(Box::new(backend), &options)?;
    let (_tenants_tx, tenants) = tokio::sync::watch::channel(Arc::new(TenantMap::new()));
    let (tx, mut rx) = kycd::gpu::usage::window_channel(16);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let thread = sampler::spawn(sampler, tenants, tx, None, shutdown.clone())?;
    let stopper = {
        let shutdown = shutdown.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(seconds));
            shutdown.cancel();
        })
    };
    while let Some(w) = rx.blocking_recv() {
        println!("{}", serde_json::to_string(&w)?);
    }
    let _ = thread.join();
    let _ = stopper.join();
    Ok(())
}
