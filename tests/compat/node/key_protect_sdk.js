// IBM's Key Protect Node SDK (@ibm-cloud/ibm-key-protect), unmodified, against p11kms.
// Run by tests/compat/test_node_clients.py with P11KMS_ADDR, P11KMS_TOKEN and P11KMS_INSTANCE.
// Exits non-zero with the failing step on the first wrong answer.
'use strict';

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { BearerTokenAuthenticator } = require('ibm-cloud-sdk-core');
const KeyProtect = require('@ibm-cloud/ibm-key-protect/ibm-key-protect-api/v2');

const addr = process.env.P11KMS_ADDR;
const instance = process.env.P11KMS_INSTANCE;
const client = new KeyProtect({
  authenticator: new BearerTokenAuthenticator({ bearerToken: process.env.P11KMS_TOKEN }),
  serviceUrl: addr + '/kms',  // as a user points the SDK at Key Protect: the URL ending in /kms
});

const KEY_TYPE = 'application/vnd.ibm.kms.key+json';
const b64 = (buf) => Buffer.from(buf).toString('base64');
let step = 'start';

async function expectStatus(promise, status) {
  try {
    await promise;
  } catch (err) {
    assert.equal(err.status, status, `${step}: ${err.status} ${err.message}`);
    return err;
  }
  assert.fail(`${step}: expected an error with status ${status}`);
}

async function main() {
  const name = 'sdk-root-' + crypto.randomBytes(4).toString('hex');

  step = 'createKey';
  const created = await client.createKey({
    bluemixInstance: instance,
    body: {
      metadata: { collectionType: KEY_TYPE, collectionTotal: 1 },
      resources: [{ type: KEY_TYPE, name, description: 'made by the IBM SDK', extractable: false }],
    },
  });
  assert.equal(created.status, 201, step);
  const key = created.result.resources[0];
  assert.match(key.id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.equal(key.name, name);
  assert.equal(key.state, 1);
  assert.equal(key.extractable, false);
  const firstVersion = key.keyVersion.id;

  step = 'getKeys';
  const listed = await client.getKeys({ bluemixInstance: instance, limit: 100 });
  assert.equal(listed.status, 200, step);
  assert.ok(listed.result.resources.some((k) => k.id === key.id), step);
  assert.ok(listed.result.resources.every((k) => !('payload' in k)), step);

  step = 'getKeyCollectionMetadata (HEAD)';
  const counted = await client.getKeyCollectionMetadata({ bluemixInstance: instance });
  assert.equal(counted.status, 200, step);
  assert.equal(Number(counted.headers['key-total']), listed.result.resources.length, step);

  step = 'getKey by id';
  const byId = await client.getKey({ bluemixInstance: instance, id: key.id });
  assert.equal(byId.result.resources[0].name, name, step);
  assert.equal(byId.result.resources[0].payload, undefined, step);
  step = 'getKey by name';
  const byName = await client.getKey({ bluemixInstance: instance, id: name });
  assert.equal(byName.result.resources[0].id, key.id, step);

  step = 'getKeyMetadata';
  const meta = await client.getKeyMetadata({ bluemixInstance: instance, id: key.id });
  assert.equal(meta.result.resources[0].id, key.id, step);
  assert.equal(meta.result.resources[0].payload, undefined, step);

  step = 'wrapKey (generated DEK, AAD)';
  const aad = ['tenant-42', 'orders'];
  const wrapped = await client.wrapKey({ bluemixInstance: instance, id: key.id, keyActionWrapBody: { aad } });
  assert.equal(wrapped.status, 200, step);
  const dek = wrapped.result.plaintext;
  assert.equal(Buffer.from(dek, 'base64').length, 32, step);
  assert.equal(wrapped.result.keyVersion.id, firstVersion, step);
  const oldCiphertext = wrapped.result.ciphertext;

  step = 'unwrapKey';
  const unwrapped = await client.unwrapKey({
    bluemixInstance: instance, id: key.id, keyActionUnwrapBody: { ciphertext: oldCiphertext, aad },
  });
  assert.equal(unwrapped.result.plaintext, dek, step);
  assert.equal(unwrapped.result.keyVersion.id, firstVersion, step);

  step = 'unwrapKey with the wrong AAD';
  await expectStatus(client.unwrapKey({
    bluemixInstance: instance, id: key.id, keyActionUnwrapBody: { ciphertext: oldCiphertext, aad: ['tenant-43'] },
  }), 400);

  step = 'rotateKey';
  const rotated = await client.rotateKey({ bluemixInstance: instance, id: key.id });
  assert.equal(rotated.status, 204, step);
  const versions = await client.getKeyVersions({ bluemixInstance: instance, id: key.id });
  assert.equal(versions.result.resources.length, 2, 'getKeyVersions');
  assert.equal(versions.result.resources[1].id, firstVersion, 'getKeyVersions: newest first');
  const latest = versions.result.resources[0].id;
  assert.notEqual(latest, firstVersion);
  assert.ok(versions.result.resources[0].creationDate, 'getKeyVersions: creationDate');

  step = 'unwrapKey of the old ciphertext after rotation';
  const after = await client.unwrapKey({
    bluemixInstance: instance, id: key.id, keyActionUnwrapBody: { ciphertext: oldCiphertext, aad },
  });
  assert.equal(after.result.plaintext, dek, step);
  assert.equal(after.result.keyVersion.id, firstVersion, step);
  assert.equal(after.result.rewrappedKeyVersion.id, latest, step);
  assert.ok(after.result.ciphertext && after.result.ciphertext !== oldCiphertext, step);

  step = 'rewrapKey';
  const rewrapped = await client.rewrapKey({
    bluemixInstance: instance, id: key.id, keyActionRewrapBody: { ciphertext: oldCiphertext, aad },
  });
  assert.equal(rewrapped.result.plaintext, undefined, step);
  assert.equal(rewrapped.result.keyVersion.id, firstVersion, step);
  assert.equal(rewrapped.result.rewrappedKeyVersion.id, latest, step);
  const again = await client.unwrapKey({
    bluemixInstance: instance, id: key.id, keyActionUnwrapBody: { ciphertext: rewrapped.result.ciphertext, aad },
  });
  assert.equal(again.result.plaintext, dek, step);

  step = 'wrapKey of a given DEK';
  const mine = b64(crypto.randomBytes(48));
  const w2 = await client.wrapKey({ bluemixInstance: instance, id: key.id, keyActionWrapBody: { plaintext: mine } });
  assert.equal(w2.result.plaintext, undefined, step);
  const u2 = await client.unwrapKey({
    bluemixInstance: instance, id: key.id, keyActionUnwrapBody: { ciphertext: w2.result.ciphertext },
  });
  assert.equal(u2.result.plaintext, mine, step);

  step = 'createKeyAlias';
  const alias = 'alias-' + crypto.randomBytes(4).toString('hex');
  const aliased = await client.createKeyAlias({ bluemixInstance: instance, id: key.id, alias });
  assert.equal(aliased.status, 201, step);
  assert.equal(aliased.result.resources[0].keyId, key.id, step);
  step = 'getKey by alias';
  assert.equal((await client.getKey({ bluemixInstance: instance, id: alias })).result.resources[0].id, key.id, step);
  step = 'unwrapKey through the alias';
  const viaAlias = await client.unwrapKey({
    bluemixInstance: instance, id: alias, keyActionUnwrapBody: { ciphertext: oldCiphertext, aad },
  });
  assert.equal(viaAlias.result.plaintext, dek, step);
  step = 'deleteKeyAlias';
  assert.equal((await client.deleteKeyAlias({ bluemixInstance: instance, id: key.id, alias })).status, 204, step);
  await expectStatus(client.getKey({ bluemixInstance: instance, id: alias }), 404);

  step = 'putPolicy (rotation every 3 months)';
  const policy = {
    metadata: { collectionType: 'application/vnd.ibm.kms.policy+json', collectionTotal: 1 },
    resources: [{ type: 'application/vnd.ibm.kms.policy+json', rotation: { interval_month: 3 } }],
  };
  const put = await client.putPolicy({ bluemixInstance: instance, id: key.id, setKeyPoliciesOneOf: policy, policy: 'rotation' });
  assert.equal(put.status, 200, step);
  assert.equal(put.result.resources[0].rotation.interval_month, 3, step);
  step = 'getPolicy';
  const got = await client.getPolicy({ bluemixInstance: instance, id: key.id, policy: 'rotation' });
  assert.equal(got.result.resources[0].rotation.interval_month, 3, step);
  step = 'putPolicy with interval_month 13';
  policy.resources[0].rotation.interval_month = 13;
  await expectStatus(client.putPolicy({ bluemixInstance: instance, id: key.id, setKeyPoliciesOneOf: policy }), 400);

  step = 'disableKey';
  assert.equal((await client.disableKey({ bluemixInstance: instance, id: key.id })).status, 204, step);
  assert.equal((await client.getKey({ bluemixInstance: instance, id: key.id })).result.resources[0].state, 2, step);
  step = 'wrapKey on a disabled key';
  await expectStatus(client.wrapKey({ bluemixInstance: instance, id: key.id, keyActionWrapBody: {} }), 409);
  step = 'enableKey';
  assert.equal((await client.enableKey({ bluemixInstance: instance, id: key.id })).status, 204, step);
  assert.equal((await client.getKey({ bluemixInstance: instance, id: key.id })).result.resources[0].state, 1, step);

  step = 'a route p11kms does not offer answers 501';
  const err = await expectStatus(client.listKeyRings({ bluemixInstance: instance }), 501);
  assert.match(err.message + JSON.stringify(err.body || ''), /key_rings/, step);

  step = 'deleteKey';
  const deleted = await client.deleteKey({ bluemixInstance: instance, id: key.id, prefer: 'return=representation' });
  assert.equal(deleted.status, 200, step);
  assert.equal(deleted.result.resources[0].state, 5, step);
  const tomb = await client.getKey({ bluemixInstance: instance, id: key.id });
  assert.equal(tomb.result.resources[0].state, 5, 'getKey after delete');
  step = 'unwrapKey on a deleted key';
  await expectStatus(client.unwrapKey({
    bluemixInstance: instance, id: key.id, keyActionUnwrapBody: { ciphertext: oldCiphertext, aad },
  }), 410);

  console.log('key protect sdk: all steps passed');
}

main().catch((e) => {
  console.error(`FAILED at step "${step}": ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
