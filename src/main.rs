fn main() -> std::process::ExitCode {
    pulses::cli::main()
}
