from wff.cli import main

main(prog_name="wff")
