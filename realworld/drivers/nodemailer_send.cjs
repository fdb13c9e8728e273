// Send one message with nodemailer (npm), STARTTLS required, certificate checked.
//
// Usage: node nodemailer_send.cjs MODULES HOST PORT CAFILE
// MODULES is the folder npm installed nodemailer into (npm install --prefix).
// requireTLS: true makes nodemailer refuse a server without STARTTLS; the CA
// is the only one trusted and Node checks the host (the loopback IP is a SAN).
// Any error is one line on stderr and exit 1.
'use strict';
const fs = require('fs');
const [modules, host, port, cafile] = process.argv.slice(2);
const nodemailer = require(require.resolve('nodemailer', { paths: [modules] }));

async function main() {
  const transport = nodemailer.createTransport({
    host,
    port: Number(port),
    secure: false,
    requireTLS: true,
    name: 'localhost',
    auth: { user: 'tester', pass: 'secret' },
    tls: { ca: [fs.readFileSync(cafile)], rejectUnauthorized: true },
    connectionTimeout: 10000,
    greetingTimeout: 10000,
    socketTimeout: 10000,
  });
  try {
    await transport.sendMail({
      from: 'sender@localhost',
      to: 'rcpt@localhost',
      subject: 'realworld nodemailer',
      text: 'One line sent by realworld/drivers/nodemailer_send.cjs.',
    });
  } finally {
    transport.close();
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(`nodemailer: ${err && (err.code || err.name)}: ${err && err.message}`);
    process.exit(1);
  },
);
