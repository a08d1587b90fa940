// node-postgres through podrouter in transaction mode: more clients than server connections,
// each using named prepared statements (`{name, text, values}`, prepared once per connection
// by pg and reused), unnamed parameterised queries, transactions with an error, and pg.Pool.
// Exits non-zero with a message on the first wrong result.
//
//     node tests/clients/node/pg_client.js URL [CLIENTS]
'use strict';
const { Client, Pool } = require('pg');

const url = process.argv[2];
const clients = Number(process.argv[3] || 6);
const rounds = 40;

function check(what, got, want) {
  const g = JSON.stringify(got), w = JSON.stringify(want);
  if (g !== w) throw new Error(`${what}: got ${g}, want ${w}`);
}

async function client(i) {
  const c = new Client({ connectionString: url });
  await c.connect();
  try {
    for (let j = 0; j < rounds; j++) {
      const k = 1 + ((i * 7 + j) % 100);
      let r = await c.query({ name: 'get', text: 'select v from kv where k = $1', values: [k] });
      check('named lookup', r.rows, [{ v: `v${k}` }]);
      r = await c.query({ name: 'sum', text: 'select $1::int + $2::int as s', values: [i, j] });
      check('named sum', r.rows, [{ s: i + j }]);
      r = await c.query('select $1::text as t', [`u${j}`]);
      check('unnamed', r.rows, [{ t: `u${j}` }]);
    }
    // An error in a named statement's execution leaves it usable.
    try {
      await c.query({ name: 'div', text: 'select 1 / $1::int as q', values: [0] });
      throw new Error('division by zero was not reported');
    } catch (e) {
      if (e.code !== '22012') throw e;
    }
    check('after error', (await c.query({ name: 'div', text: 'select 1 / $1::int as q', values: [1] })).rows, [{ q: 1 }]);
    for (let j = 0; j < 10; j++) {
      await c.query('begin');
      await c.query({ name: 'bump', text: 'update counters set n = n + 1 where id = $1', values: [i] });
      const r = await c.query({ name: 'count', text: 'select n from counters where id = $1', values: [i] });
      check('in transaction', r.rows, [{ n: j + 1 }]);
      await c.query('commit');
    }
    await c.query('begin');
    await c.query({ name: 'bump', text: 'update counters set n = n + 1 where id = $1', values: [i] });
    try {
      await c.query({ name: 'div', text: 'select 1 / $1::int as q', values: [0] });
    } catch (e) {
      if (e.code !== '22012') throw e;
    }
    await c.query('rollback');
    check('after rollback', (await c.query({ name: 'count', text: 'select n from counters where id = $1', values: [i] })).rows, [{ n: 10 }]);
  } finally {
    await c.end();
  }
}

async function pooled(pool, i) {
  for (let j = 0; j < 20; j++) {
    const r = await pool.query({ name: 'double', text: 'select $1::int * 2 as d', values: [i * 100 + j] });
    check('pooled', r.rows, [{ d: (i * 100 + j) * 2 }]);
  }
}

async function main() {
  const setup = new Client({ connectionString: url });
  await setup.connect();
  await setup.query('drop table if exists kv, counters');
  await setup.query('create table kv (k int primary key, v text)');
  await setup.query("insert into kv select g, 'v' || g from generate_series(1, 100) g");
  await setup.query('create table counters (id int primary key, n int not null default 0)');
  await setup.query('insert into counters select g, 0 from generate_series(0, $1::int) g', [clients]);
  await setup.end();
  const failures = [];
  const results = await Promise.allSettled([...Array(clients).keys()].map(client));
  results.forEach((r, i) => { if (r.status === 'rejected') failures.push(`client ${i}: ${r.reason}`); });
  const pool = new Pool({ connectionString: url, max: 4 });
  const pooledResults = await Promise.allSettled([...Array(clients).keys()].map((i) => pooled(pool, i)));
  pooledResults.forEach((r, i) => { if (r.status === 'rejected') failures.push(`pool user ${i}: ${r.reason}`); });
  await pool.end();
  if (failures.length) {
    console.error('node-postgres through podrouter:\n' + failures.join('\n'));
    process.exit(1);
  }
  console.log(`node-postgres ${require('pg/package.json').version}: ${clients} clients ok`);
}

main().catch((e) => { console.error(e); process.exit(1); });
