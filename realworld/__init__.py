"""The real-server tier: the catalogue against private Postfix and Dovecot instances.

``install.sh`` installs the Debian packages, :mod:`realworld.run` starts private
instances on loopback (no systemd, no system configuration touched), runs
``starttls-harness check`` against each and compares the verdicts with
``expected.json``; :mod:`realworld.table` renders that table into the README.
"""
