"""The project's tooling, outside the installed package: run from the repository root as
`python -m tools.<module>` (cuda_machine_code, triton_machine_code, framework_step)."""
