//! The `vmm` binary: parse the command line, run the VM, and turn the outcome into an exit
//! status with one clear line on stderr when something is wrong.

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::Cli;

fn main() -> ExitCode {
    // Whatever happens, leave the user's terminal as we found it.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        devices::chardev::restore_terminal();
        default_hook(info);
    }));
    let cli = Cli::parse();
    if let Some(vmm::cli::Command::Ctl(args)) = &cli.command {
        return vmm::ctl::main(args);
    }
    if let Some(vmm::cli::Command::Img(args)) = &cli.command {
        return vmm::img::run(args);
    }
    let cfg = match cli.into_config(vmm::kvm::host_memory_mib()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = vmm::probe_kernel(&cfg) {
        eprintln!("vmm: error: {e}");
        return ExitCode::from(2);
    }
    match vmm::run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The console backend (and with it the terminal mode) was restored on the way out.
            eprintln!("vmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}
