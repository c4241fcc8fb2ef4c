//! `kycd-gen-docs OUTDIR`: renders the man pages and shell completions of `kycd`, `kycctl`
//! and `kycd-collector` from their clap definitions (`kycd::cli`, `kycd_collector::cli`),
//! so that what is documented is exactly what the binaries parse.
//!
//! Writes (replacing what is there):
//!   OUTDIR/man/kycd.8, kycctl.8, kycd-collector.8, and one page per subcommand
//!       (kycctl-admit.8, kycd-collector-hosts-add.8, …): section 8, system administration
//!       (a daemon, its root-run admin tool, a service);
//!   OUTDIR/completions/bash/NAME, zsh/_NAME, fish/NAME.fish for each binary, named as
//!       bash-completion, zsh's vendor-completions and fish's vendor_completions.d expect.
//!
//! packaging/build-packages runs it before `cargo deb` / `cargo generate-rpm` pack the files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::CommandFactory as _;
use clap_complete::Shell;

const SECTION: &str = "8";
const MANUAL: &str = "kycd manual";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        bail!("usage: kycd-gen-docs OUTDIR");
    };
    let out = PathBuf::from(out);
    let commands = [
        kycd::cli::kycd::Cli::command(),
        kycd::cli::kycctl::Cli::command(),
        kycd_collector::cli::Cli::command(),
    ];
    let man_dir = out.join("man");
    std::fs::create_dir_all(&man_dir).with_context(|| format!("creating {}", man_dir.display()))?;
    let mut pages = 0;
    for cmd in &commands {
        let mut cmd = cmd.clone().disable_help_subcommand(true);
        // Sets every subcommand's display name to "parent-sub", the page names used below.
        cmd.build();
        pages += write_man(&cmd, &man_dir)?;
    }
    for (shell, dir, file) in
        [(Shell::Bash, "bash", "{}"), (Shell::Zsh, "zsh", "_{}"), (Shell::Fish, "fish", "{}.fish")]
    {
        let dir = out.join("completions").join(dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for cmd in &commands {
            let name = cmd.get_name().to_owned();
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut buf);
            let path = dir.join(file.replace("{}", &name));
            std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    println!("{pages} man pages and {} completion scripts in {}", 3 * commands.len(), out.display());
    Ok(())
}

/// Writes the page of `cmd` and of each of its (visible) subcommands; returns how many.
fn write_man(cmd: &clap::Command, dir: &Path) -> anyhow::Result<usize> {
    let mut pages = 0;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages += write_man(sub, dir)?;
    }
    let version = cmd.get_version().unwrap_or(env!("CARGO_PKG_VERSION"));
    // clap_mangen would render `after_help` (the exit codes) as filled text in a section
    // named EXTRA; man pages have EXIT STATUS for it, and the table needs its line breaks.
    let exit_status = cmd.get_after_help().map(|h| h.to_string());
    let page = cmd.clone().after_help(None::<&'static str>);
    let man = clap_mangen::Man::new(page).section(SECTION).manual(MANUAL).source(format!("kycd {version}"));
    let path = dir.join(man.get_filename());
    let mut buf = Vec::new();
    man.render(&mut buf).with_context(|| format!("rendering {}", path.display()))?;
    let mut text = String::from_utf8(buf).context("clap_mangen wrote non-UTF-8")?;
    if let Some(exit_status) = exit_status {
        let section = exit_status_section(&exit_status);
        match text.find("\n.SH VERSION") {
            Some(at) => text.insert_str(at + 1, &section),
            None => text.push_str(&section),
        }
    }
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(pages + 1)
}

/// An EXIT STATUS section with `text` kept line by line (no filling), roff-escaped.
fn exit_status_section(text: &str) -> String {
    let mut out = String::from(".SH \"EXIT STATUS\"\n.nf\n");
    for line in text.lines() {
        let line = line.replace('\\', "\\e");
        // A line starting with a dot or an apostrophe would be read as a request.
        if line.starts_with(['.', '\'']) {
            out.push_str("\\&");
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(".fi\n");
    out
}
