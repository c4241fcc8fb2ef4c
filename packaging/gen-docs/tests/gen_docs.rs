//! `kycd-gen-docs OUTDIR` writes a section-8 page for every command and subcommand of the
//! three binaries, with the exit codes in EXIT STATUS, and the completion files under the
//! names the packages install.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use clap::CommandFactory as _;

fn generate() -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_kycd-gen-docs")).arg(out.path()).status().unwrap();
    assert!(status.success());
    out
}

#[test]
fn every_command_and_subcommand_has_a_section_8_page() {
    let out = generate();
    let man = out.path().join("man");
    for cmd in [
        kycd::cli::kycd::Cli::command(),
        kycd::cli::kycctl::Cli::command(),
        kycd_collector::cli::Cli::command(),
    ] {
        let name = cmd.get_name().to_owned();
        let page = std::fs::read_to_string(man.join(format!("{name}.8"))).unwrap();
        assert!(page.contains(&format!(".TH {name} 8")), "{name}.8 header:\n{page}");
        for sub in cmd.get_subcommands() {
            let file = man.join(format!("{name}-{}.8", sub.get_name()));
            assert!(file.exists(), "{} missing", file.display());
        }
    }
    let kycctl = std::fs::read_to_string(man.join("kycctl.8")).unwrap();
    assert!(kycctl.contains(".SH \"EXIT STATUS\"\n.nf\n"), "{kycctl}");
    assert!(kycctl.contains("the agent is unreachable or did not answer in time"));
    assert!(!kycctl.contains(".SH EXTRA"), "exit codes must not also appear as EXTRA");
    assert!(kycctl.contains("4  status: the agent answered and is unhealthy"), "{kycctl}");
    // Global options are on every page, the top level's and each subcommand's.
    for page in ["kycctl.8", "kycctl-status.8", "kycctl-workloads.8", "kycctl-host-id.8"] {
        let text = std::fs::read_to_string(man.join(page)).unwrap();
        for option in ["\\-\\-socket", "\\-\\-config", "\\-\\-json", "\\-\\-output"] {
            assert!(text.contains(option), "{page} lacks {option}:\n{text}");
        }
    }
    let status = std::fs::read_to_string(man.join("kycctl-status.8")).unwrap();
    assert!(status.contains(".SH \"EXIT STATUS\""), "{status}");
    assert!(status.contains("4  the agent answered and is unhealthy"), "{status}");
    let kycd = std::fs::read_to_string(man.join("kycd.8")).unwrap();
    assert!(kycd.contains("EXIT STATUS") && kycd.contains("2 invalid configuration or usage"));
}

#[test]
fn completions_are_named_for_bash_zsh_and_fish() {
    let out = generate();
    let c = out.path().join("completions");
    for name in ["kycd", "kycctl", "kycd-collector"] {
        let bash = std::fs::read_to_string(c.join("bash").join(name)).unwrap();
        assert!(bash.contains(&format!("complete -F _{}", name.replace('-', "__"))), "{name}:\n{bash}");
        let zsh = std::fs::read_to_string(c.join("zsh").join(format!("_{name}"))).unwrap();
        assert!(zsh.starts_with(&format!("#compdef {name}")), "{name}:\n{zsh}");
        let fish = std::fs::read_to_string(c.join("fish").join(format!("{name}.fish"))).unwrap();
        assert!(fish.contains(&format!("complete -c {name}")), "{name}:\n{fish}");
    }
}

/// kycctl's global options (`--socket`, `--config`, `--json`, `-o`/`--output`) complete
/// before the subcommand and after it, in each shell.
#[test]
fn kycctl_completions_offer_the_global_options_before_and_after_the_subcommand() {
    let out = generate();
    let c = out.path().join("completions");
    let bash = std::fs::read_to_string(c.join("bash/kycctl")).unwrap();
    // The `opts=` line of the top level (`kycctl)`) and of a subcommand.
    for case in [
        "        kycctl)\n",
        "        kycctl__subcmd__status)\n",
        "        kycctl__subcmd__host__subcmd__id)\n",
    ] {
        let at = bash.find(case).unwrap_or_else(|| panic!("no {case:?} in:\n{bash}"));
        let opts = bash[at..].lines().find(|l| l.trim_start().starts_with("opts=")).unwrap();
        for flag in ["--socket", "--config", "--json", "-o", "--output"] {
            assert!(opts.split(['"', ' ']).any(|w| w == flag), "bash {case:?} lacks {flag}: {opts}");
        }
    }
    let zsh = std::fs::read_to_string(c.join("zsh/_kycctl")).unwrap();
    for case in ["(status)\n_arguments", "(workloads)\n_arguments"] {
        let at = zsh.find(case).unwrap_or_else(|| panic!("no {case:?} in:\n{zsh}"));
        let block = &zsh[at..at + zsh[at..].find("&& ret=0").unwrap()];
        for flag in ["'--socket=[", "'--config=[", "'--json[", "'-o+[", "'--output=["] {
            assert!(block.contains(flag), "zsh {case:?} lacks {flag}:\n{block}");
        }
    }
    let fish = std::fs::read_to_string(c.join("fish/kycctl.fish")).unwrap();
    for condition in ["__fish_kycctl_needs_command", "__fish_kycctl_using_subcommand status"] {
        let lines: Vec<&str> = fish.lines().filter(|l| l.contains(&format!("-n \"{condition}\""))).collect();
        for flag in ["-l socket", "-l config", "-l json", "-s o -l output"] {
            assert!(lines.iter().any(|l| l.contains(flag)), "fish {condition} lacks {flag}:\n{lines:#?}");
        }
    }
}

#[test]
fn a_missing_or_extra_argument_is_a_usage_error() {
    let bin = env!("CARGO_BIN_EXE_kycd-gen-docs");
    assert!(!Command::new(bin).status().unwrap().success());
    assert!(!Command::new(bin).args(["a", "b"]).status().unwrap().success());
}
