"""The real-server tier: the catalogue against private Postfix and Dovecot instances.

``install.sh`` installs the Debian packages, :mod:`realworld.run` starts private
instances on loopback (no systemd, no system configuration touched), runs
``starttls-harness check`` against each and compares the verdicts with
``expected.json``; :mod:`realworld.table` renders that table into the README.
:mod:`realworld.clients` is the client tier: ``check-client`` against real mail
clients (curl, msmtp, smtplib, imaplib, aiosmtplib, nodemailer, imapflow), compared
with ``expected-clients.json``; ``realworld.run`` runs it after the servers.
"""
