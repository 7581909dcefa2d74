//! The `vmm` binary: parse the command line, run the VM, and turn the outcome into an exit
//! status with one clear line on stderr when something is wrong.

use std::process::ExitCode;

use api::VmConfig;
use clap::Parser;
use vmm::cli::{Cli, Incoming, Launch};
use vmm::Start;

fn main() -> ExitCode {
    // Whatever happens, leave the user's terminal as we found it.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        devices::chardev::restore_terminal();
        default_hook(info);
    }));
    let cli = Cli::parse();
    if cli.command.is_none() {
        if let Err(e) = vmm::logger::init(cli.log_level, cli.log_file.as_deref()) {
            eprintln!("vmm: error: cannot open the log file: {e}");
            return ExitCode::from(2);
        }
    }
    if let Some(vmm::cli::Command::Ctl(args)) = &cli.command {
        return vmm::ctl::main(args);
    }
    if let Some(vmm::cli::Command::Img(args)) = &cli.command {
        return vmm::img::run(args);
    }
    let launch = match cli.into_launch(vmm::kvm::host_memory_mib()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return ExitCode::from(2);
        }
    };
    let paused = launch.paused;
    let (cfg, start) = match prepare(launch) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return ExitCode::from(2);
        }
    };
    match vmm::run(&cfg, start, paused) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The console backend (and with it the terminal mode) was restored on the way out.
            eprintln!("vmm: error: {e}");
            if e.is_bad_input() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Checks the input before anything starts: the kernel to boot, or the state to restore and
/// the configuration it will run with.
fn prepare(launch: Launch) -> Result<(VmConfig, Start), Box<dyn std::error::Error>> {
    let Launch {
        config,
        incoming,
        constraints,
        on_reboot_given,
        ..
    } = launch;
    match incoming {
        None => {
            vmm::probe_kernel(&config)?;
            Ok((config, Start::Boot))
        }
        Some(Incoming::File(path)) => {
            let loaded = vmm::snapshot::load(&path)?;
            let cfg = vmm::snapshot::merge_config(
                &loaded.config,
                &config,
                &constraints,
                on_reboot_given,
            )?;
            vmm::snapshot::check_disks(&cfg)?;
            Ok((cfg, Start::Restore(Box::new(loaded))))
        }
        Some(Incoming::Defer) => Ok((
            config,
            Start::Defer {
                constraints,
                on_reboot_given,
                listen: None,
            },
        )),
        Some(Incoming::Listen(addr)) => Ok((
            config,
            Start::Defer {
                constraints,
                on_reboot_given,
                listen: Some(addr),
            },
        )),
    }
}
