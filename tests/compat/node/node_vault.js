// npm's node-vault, unmodified, against p11kms: its transit commands on the default mount, and
// the same calls through its generic read/write/list/delete on a mount it enables itself.
// Run by tests/compat/test_node_clients.py with P11KMS_ADDR and P11KMS_TOKEN.
'use strict';

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const nodeVault = require('node-vault');

const vault = nodeVault({ apiVersion: 'v1', endpoint: process.env.P11KMS_ADDR, token: process.env.P11KMS_TOKEN });
const b64 = (s) => Buffer.from(s).toString('base64');
const unb64 = (s) => Buffer.from(s, 'base64').toString();
let step = 'start';

async function expectStatus(promise, status) {
  try {
    await promise;
  } catch (err) {
    assert.equal(err.response && err.response.statusCode, status, `${step}: ${err.message}`);
    return err;
  }
  assert.fail(`${step}: expected an error with status ${status}`);
}

async function defaultMount(name) {
  step = 'transitCreateKey';
  await vault.transitCreateKey({ name });
  step = 'transitReadKey';
  const key = await vault.transitReadKey({ name });
  assert.equal(key.data.name, name, step);
  assert.equal(key.data.type, 'aes256-gcm96', step);
  assert.equal(key.data.latest_version, 1, step);
  step = 'transitListKeys';
  const listed = await vault.transitListKeys();
  assert.ok(listed.data.keys.includes(name), step);
  step = 'encryptData';
  const enc = await vault.encryptData({ name, plaintext: b64('hello node-vault') });
  assert.match(enc.data.ciphertext, /^vault:v1:/, step);
  step = 'decryptData';
  const dec = await vault.decryptData({ name, ciphertext: enc.data.ciphertext });
  assert.equal(unb64(dec.data.plaintext), 'hello node-vault', step);
  step = 'write keys/:name/rotate';
  await vault.write(`transit/keys/${name}/rotate`, {});
  step = 'rewrapData';
  const rewrapped = await vault.rewrapData({ name, ciphertext: enc.data.ciphertext });
  assert.match(rewrapped.data.ciphertext, /^vault:v2:/, step);
  assert.equal(unb64((await vault.decryptData({ name, ciphertext: rewrapped.data.ciphertext })).data.plaintext),
               'hello node-vault', step);
  step = 'transitDeleteKey without deletion_allowed';
  await expectStatus(vault.transitDeleteKey({ name }), 400);
  step = 'write keys/:name/config';
  await vault.write(`transit/keys/${name}/config`, { deletion_allowed: true });
  step = 'transitDeleteKey';
  await vault.transitDeleteKey({ name });
  step = 'transitReadKey after delete';
  await expectStatus(vault.transitReadKey({ name }), 404);
  return enc.data.ciphertext;
}

async function mounted(mount, name, defaultCiphertext) {
  step = 'mount';
  await vault.mount({ mount_point: mount, type: 'transit', description: 'node-vault test engine' });
  step = 'mounts';
  const mounts = await vault.mounts();
  assert.equal(mounts.data[`${mount}/`].type, 'transit', step);
  assert.equal(mounts.data['transit/'].type, 'transit', step);
  step = 'mount of a non-transit type';
  await expectStatus(vault.mount({ mount_point: `${mount}-kv`, type: 'kv' }), 400);

  step = 'write <mount>/keys/:name';
  await vault.write(`${mount}/keys/${name}`, {});
  step = 'read <mount>/keys/:name';
  assert.equal((await vault.read(`${mount}/keys/${name}`)).data.name, name, step);
  step = 'list <mount>/keys';
  assert.deepEqual((await vault.list(`${mount}/keys`)).data.keys, [name], step);
  step = 'write <mount>/encrypt/:name';
  const enc = await vault.write(`${mount}/encrypt/${name}`, { plaintext: b64('mounted secret') });
  step = 'write <mount>/decrypt/:name';
  const dec = await vault.write(`${mount}/decrypt/${name}`, { ciphertext: enc.data.ciphertext });
  assert.equal(unb64(dec.data.plaintext), 'mounted secret', step);
  step = 'write <mount>/datakey/plaintext/:name';
  const dk = await vault.write(`${mount}/datakey/plaintext/${name}`, {});
  assert.equal(Buffer.from(dk.data.plaintext, 'base64').length, 32, step);
  step = 'write <mount>/keys/:name/rotate and rewrap';
  await vault.write(`${mount}/keys/${name}/rotate`, {});
  const rw = await vault.write(`${mount}/rewrap/${name}`, { ciphertext: enc.data.ciphertext });
  assert.match(rw.data.ciphertext, /^vault:v2:/, step);
  step = 'the default mount cannot decrypt the mounted key\'s ciphertext';
  await vault.transitCreateKey({ name });
  await expectStatus(vault.decryptData({ name, ciphertext: enc.data.ciphertext }), 400);
  step = 'the mounted key cannot decrypt the default mount\'s ciphertext';
  await expectStatus(vault.write(`${mount}/decrypt/${name}`, { ciphertext: defaultCiphertext }), 400);

  step = 'unmount';
  await vault.unmount({ mount_point: mount });
  step = 'mounts after unmount';
  assert.equal((await vault.mounts()).data[`${mount}/`], undefined, step);
  step = 'a route under the unmounted path';
  await expectStatus(vault.read(`${mount}/keys/${name}`), 404);
  step = 'unmount transit/ is refused';
  await expectStatus(vault.unmount({ mount_point: 'transit' }), 400);
}

async function main() {
  const suffix = crypto.randomBytes(4).toString('hex');
  const ciphertext = await defaultMount('nv-' + suffix);
  await mounted('nvmount' + suffix, 'nv-' + suffix, ciphertext);
  console.log('node-vault: all steps passed');
}

main().catch((e) => {
  console.error(`FAILED at step "${step}": ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
