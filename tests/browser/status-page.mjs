// Real-browser test of the opsgate status page (GET /_ops/), headless Chromium.
//
// Run through ci/check-status-page.sh, which starts opsgate and its throwaway
// dependencies and passes:
//   ADMIN_URL    http://127.0.0.1:PORT of the admin listener (a token is configured)
//   PROXY_URL    http://127.0.0.1:PORT of the proxy listener
//   ADMIN_TOKEN  the admin token
//   TCP_PID      pid of the TCP listener behind the "queue" check (killed here)
//   CHROMIUM     browser binary (default /usr/bin/chromium)
//   SCREENSHOT   where to write the screenshot (default target/status-page.png)
//   WAIT_MS      bound of every wait (default 10000)
// Expects upstream "app" (route "/", healthy) and upstream "payments" (route
// "/payments", nothing listening, breaker failure_threshold = 1).
import { chromium } from 'playwright-core';

const env = (k, d) => {
  const v = process.env[k] ?? d;
  if (v === undefined) throw new Error(`${k} is not set`);
  return v;
};
const ADMIN = env('ADMIN_URL');
const PROXY = env('PROXY_URL');
const TOKEN = env('ADMIN_TOKEN');
const TCP_PID = Number(env('TCP_PID'));
const SHOT = env('SCREENSHOT', 'target/status-page.png');
const WAIT = Number(env('WAIT_MS', '10000'));

const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic',
];

let step = 'start';
const t0 = Date.now();
function ok(msg) {
  console.log(`ok   ${((Date.now() - t0) / 1000).toFixed(1).padStart(5)}s  ${msg}`);
}

async function api(method, path) {
  const r = await fetch(ADMIN + path, { method, headers: { Authorization: `Bearer ${TOKEN}` } });
  if (!r.ok) throw new Error(`${method} ${path}: HTTP ${r.status}`);
  return r.json();
}

const browser = await chromium.launch({
  executablePath: env('CHROMIUM', '/usr/bin/chromium'),
  headless: true,
  args: FLAGS,
});
let failed = false;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    // A missing favicon is not the page's fault; script errors and CSP violations are.
    if (m.type() === 'error' && !/favicon|Failed to load resource/.test(m.text())) {
      problems.push(`console error: ${m.text()}`);
    }
  });
  let navigations = 0;
  page.on('framenavigated', (f) => { if (f === page.mainFrame()) navigations += 1; });

  step = 'the token prompt';
  const shell = await page.goto(`${ADMIN}/_ops/`);
  if (shell.status() !== 200) throw new Error(`GET /_ops/: HTTP ${shell.status()}`);
  await page.getByLabel('Admin token').waitFor({ state: 'visible' });
  if (await page.locator('#dash').isVisible()) throw new Error('dashboard visible before sign-in');
  ok('the page asks for the token');

  step = 'a wrong token is refused';
  await page.getByLabel('Admin token').fill('not-the-token');
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('alert').filter({ hasText: 'not accepted' }).waitFor();
  ok('a wrong token is refused');

  step = 'sign in';
  await page.getByLabel('Admin token').fill(TOKEN);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.locator('#dash').waitFor({ state: 'visible' });
  const cookie = (await context.cookies(ADMIN + '/_ops/')).find((c) => c.name === 'opsgate_session');
  if (!cookie || !cookie.httpOnly || cookie.sameSite !== 'Strict') {
    throw new Error(`session cookie missing or not HttpOnly/SameSite=Strict: ${JSON.stringify(cookie)}`);
  }
  if (cookie.value.includes(TOKEN)) throw new Error('the session cookie carries the token itself');
  ok('the token is accepted; session cookie is HttpOnly, SameSite=Strict');

  step = 'initial render';
  await page.locator('tr[data-check="queue"][data-status="healthy"]').waitFor();
  await page.locator('tr[data-check="app"][data-status="healthy"]').waitFor();
  await page.locator('tr[data-breaker="payments"][data-state="closed"]').waitFor();
  await page.locator('tr[data-breaker="app"][data-state="closed"]').waitFor();
  await page.locator('#v-health', { hasText: 'healthy' }).waitFor();
  await page.locator('#conn[data-state="live"]').waitFor();
  ok('checks "app" and "queue" healthy, breakers "app" and "payments" closed, event stream live');

  // From here on the page must follow changes by itself.
  await page.evaluate(() => { window.__sameDocument = true; });
  const navBefore = navigations;

  step = 'traffic';
  for (let i = 0; i < 20; i++) {
    const r = await fetch(`${PROXY}/`);
    await r.arrayBuffer();
    if (r.status !== 200) throw new Error(`GET ${PROXY}/: HTTP ${r.status}`);
  }

  step = 'dependency down';
  process.kill(TCP_PID, 'SIGTERM');
  await page.locator('tr[data-check="queue"][data-status="unhealthy"]').waitFor();
  await page.locator('#v-health', { hasText: 'unhealthy' }).waitFor();
  await page.locator('#log li[data-kind="check"]', { hasText: 'queue' }).first().waitFor();
  ok('TCP dependency killed: check "queue" shows unhealthy, logged, no reload');

  step = 'breaker trip';
  for (let i = 0; i < 3; i++) {
    const r = await fetch(`${PROXY}/payments/charge`);
    await r.arrayBuffer();
    if (r.status < 500) throw new Error(`GET ${PROXY}/payments/charge: HTTP ${r.status}, expected 5xx`);
  }
  const b = (await api('GET', '/_ops/breakers')).breakers.find((x) => x.name === 'payments');
  if (!b || b.state !== 'open') throw new Error(`API: breaker payments is ${b && b.state}, expected open`);
  await page.locator('tr[data-breaker="payments"][data-state="open"].alert').waitFor();
  await page.locator('#v-brk', { hasText: '1 open' }).waitFor();
  await page.locator('#log li[data-kind="breaker"]', { hasText: 'payments' }).first().waitFor();
  ok('failing requests opened breaker "payments": shown open and highlighted, no reload');

  step = 'counters and rates';
  // Counters move without a state change too (the page refreshes them on its own).
  await page.waitForFunction(() => {
    const row = document.querySelector('tr[data-breaker="payments"]');
    return row && row.cells[7].textContent === '2';
  }, null, { timeout: WAIT });
  ok('breaker "payments" counts the 2 rejected calls');
  await page.locator('#s-err', { hasText: '3 total' }).waitFor();
  await page.locator('#v-rps').filter({ hasText: /\/s$/ }).waitFor();
  await page.locator('#v-err').filter({ hasText: /\/s$/ }).waitFor();
  ok(`request rate ${await page.locator('#v-rps').innerText()}, 5xx rate ${await page.locator('#v-err').innerText()}`);

  step = 'no reload';
  const same = await page.evaluate(() => window.__sameDocument === true);
  if (!same || navigations !== navBefore) throw new Error('the page reloaded or navigated');
  if (problems.length) throw new Error(problems.join('\n'));
  ok('same document throughout, no script errors or CSP violations');

  step = 'screenshot';
  await page.screenshot({ path: SHOT, fullPage: true });
  console.log(`screenshot: ${SHOT}`);
  const dark = SHOT.replace(/(\.png)?$/, '-dark.png');
  await page.emulateMedia({ colorScheme: 'dark' });
  await page.screenshot({ path: dark, fullPage: true });
  console.log(`screenshot: ${dark}`);
} catch (e) {
  failed = true;
  console.error(`FAIL (${step}): ${e.message}`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
