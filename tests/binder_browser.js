#!/usr/bin/env node
// A user opens a Binder link in headless Chromium (playwright-core), logs in
// on the hub's login form when it shows (authenticated Binder), and waits for
// the notebook interface of the session (anonymous Binder: no BINDER_USER,
// no login). Used by tests/test_deployment.py.
//
//   BINDER_USER=... BINDER_PASSWORD=... node binder_browser.js URL OUTDIR [TIMEOUT_S]
//
// The credentials come from the environment, never the command line.
// Screenshots: OUTDIR/01-*.png ...; stdout: one JSON line with the final URL,
// the screenshots and the times (ms since start) of the login form shown,
// submitted, and the notebook interface rendered. Exit 0 when it rendered.
const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const [url, outdir, timeoutS = '300'] = process.argv.slice(2);
const deadline = Date.now() + Number(timeoutS) * 1000;
const start = Date.now();
const t = () => Date.now() - start;
const log = (...a) => console.error(`[browser +${t()}ms]`, ...a);

(async () => {
  fs.mkdirSync(outdir, { recursive: true });
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
  });
  const result = { shots: [], times: {} };
  let n = 0;
  const page = await (await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 } })).newPage();
  const snap = async (name) => {
    const file = path.join(outdir, `${String(++n).padStart(2, '0')}-${name}.png`);
    try {
      await page.screenshot({ path: file, timeout: 15000 });
      result.shots.push(file);
      log('screenshot', file, page.url());
    } catch (e) {
      log('screenshot failed', e.message.split('\n')[0]);
    }
  };
  try {
    await page.goto(url, { timeout: 60000 });
    if (process.env.BINDER_USER) {
      await page.waitForSelector('input[name=username]', { timeout: 60000 });
      result.times.login_form = t();
      await page.fill('input[name=username]', process.env.BINDER_USER);
      await page.fill('input[name=password]', process.env.BINDER_PASSWORD);
      await snap('login');
      result.times.login_submitted = t();
      await page.click('input[type=submit], button[type=submit]');
    }
    // the Binder page (build log, launch progress), then the session
    let binderShot = false;
    while (Date.now() < deadline) {
      const p = new URL(page.url()).pathname;
      if (/\/user\/[^/]+\//.test(p)) break;
      if (!binderShot && p.includes('/services/binder/v2/')) {
        await page.waitForTimeout(1000);
        await snap('binder-launching');
        binderShot = true;
      }
      await page.waitForTimeout(250);
    }
    result.times.session_url = t();
    await page.waitForSelector('.jp-Launcher, .jp-Notebook, #notebook-container, .jp-DirListing',
                               { timeout: Math.max(1000, deadline - Date.now()) });
    result.times.notebook = t();
    // the repository's files in the file browser
    await page.waitForSelector('.jp-DirListing-item', { timeout: 30000 }).catch(() => log('no files listed'));
    await page.waitForTimeout(1000);
    await snap('notebook');
    result.url = page.url();
    result.ok = true;
  } catch (e) {
    result.error = e.message.split('\n')[0];
    result.url = page.url();
    await snap('error');
  }
  await browser.close();
  console.log(JSON.stringify(result));
  process.exit(result.ok ? 0 : 2);
})();
