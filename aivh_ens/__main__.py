"""``python -m aivh_ens`` runs the command line."""

from aivh_ens.cli import main

main()
