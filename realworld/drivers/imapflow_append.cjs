// APPEND one message with imapflow (npm), STARTTLS required, certificate checked.
//
// Usage: node imapflow_append.cjs MODULES HOST PORT CAFILE
// MODULES is the folder npm installed imapflow into (npm install --prefix).
// doSTARTTLS: true makes imapflow refuse a server without STARTTLS; the CA is
// the only one trusted and Node checks the host (the loopback IP is a SAN).
// Any error is one line on stderr and exit 1.
'use strict';
const fs = require('fs');
const [modules, host, port, cafile] = process.argv.slice(2);
const { ImapFlow } = require(require.resolve('imapflow', { paths: [modules] }));

const message =
  'From: sender@localhost\r\nTo: tester@localhost\r\nSubject: realworld imapflow\r\n' +
  '\r\nOne line appended by realworld/drivers/imapflow_append.cjs.\r\n';

async function main() {
  const client = new ImapFlow({
    host,
    port: Number(port),
    secure: false,
    doSTARTTLS: true,
    auth: { user: 'tester', pass: 'secret' },
    tls: { ca: [fs.readFileSync(cafile)], rejectUnauthorized: true },
    logger: false,
    connectionTimeout: 10000,
    greetingTimeout: 10000,
    socketTimeout: 10000,
  });
  client.on('error', () => {}); // the awaited call below reports it
  await client.connect();
  await client.append('INBOX', message);
  await client.logout();
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(`imapflow: ${err && (err.code || err.name)}: ${err && err.message}`);
    process.exit(1);
  },
);
