// Chat with llmserver: a model picker, a streamed answer (the gateway's OpenAI-compatible /v1 with
// server-sent events), a stop button and a copy button.
import { Clipboard } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { el, rawFetch, request } from './api';

export class ChatPanel extends Widget {
  private models = el('select', { 'aria-label': 'model', class: 'bkg-chat-model' });
  private log = el('div', { class: 'bkg-chat-log', 'aria-live': 'polite' });
  private input = el('textarea', { rows: '3', placeholder: 'Ask something (Enter sends, Shift+Enter: new line)', 'aria-label': 'message' });
  private send = el('button', { class: 'jp-Button bkg-chat-send' }, 'Send');
  private stop = el('button', { class: 'jp-Button bkg-chat-stop' }, 'Stop');
  private history: { role: string; content: string }[] = [];
  private controller: AbortController | null = null;

  constructor() {
    super();
    this.id = 'bkg-chat';
    this.addClass('bkg-chat');
    this.title.label = 'bkg chat';
    this.title.closable = true;
    (this.stop as HTMLButtonElement).disabled = true;
    this.send.addEventListener('click', () => void this.ask());
    this.stop.addEventListener('click', () => this.controller?.abort());
    this.input.addEventListener('keydown', ev => {
      if (ev.key === 'Enter' && !ev.shiftKey) {
        ev.preventDefault();
        void this.ask();
      }
    });
    this.node.append(
      el('div', { class: 'bkg-chat-tools' }, el('label', {}, 'Model ', this.models)),
      this.log,
      el('div', { class: 'bkg-chat-input' }, this.input, this.send, this.stop)
    );
    void this.loadModels();
  }

  private async loadModels(): Promise<void> {
    try {
      const r = await request('v1/models');
      this.models.replaceChildren(...r.data.map((m: any) => el('option', { value: m.id }, m.id)));
    } catch (e: any) {
      this.models.replaceChildren(el('option', { value: '' }, `(no models: ${e.message})`));
    }
  }

  private bubble(role: string, text: string): HTMLElement {
    const body = el('div', { class: 'bkg-chat-text' }, text);
    const copy = el('button', { class: 'jp-Button bkg-chat-copy', title: 'Copy', 'aria-label': 'copy' }, 'Copy');
    copy.addEventListener('click', () => Clipboard.copyToSystem(body.textContent || ''));
    const node = el('div', { class: `bkg-chat-msg bkg-chat-${role}` }, el('b', {}, role), body, copy);
    this.log.append(node);
    this.log.scrollTop = this.log.scrollHeight;
    return body;
  }

  async ask(): Promise<void> {
    const text = this.input.value.trim();
    if (!text || this.controller) {
      return;
    }
    this.input.value = '';
    this.bubble('user', text);
    this.history.push({ role: 'user', content: text });
    const out = this.bubble('assistant', '');
    this.controller = new AbortController();
    (this.stop as HTMLButtonElement).disabled = false;
    (this.send as HTMLButtonElement).disabled = true;
    let answer = '';
    try {
      const response = await rawFetch('v1/chat/completions', {
        method: 'POST',
        body: JSON.stringify({ model: this.models.value || undefined, messages: this.history, stream: true }),
        signal: this.controller.signal
      });
      if (!response.ok || !response.body) {
        const err = await response.json().catch(() => ({}));
        throw new Error(err?.error?.message || response.statusText);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) {
          break;
        }
        buffer += decoder.decode(value, { stream: true });
        let cut: number;
        while ((cut = buffer.indexOf('\n\n')) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split('\n')) {
            if (!line.startsWith('data:')) {
              continue;
            }
            const data = line.slice(5).trim();
            if (data === '[DONE]') {
              continue;
            }
            const chunk = JSON.parse(data);
            if (chunk.error) {
              throw new Error(chunk.error.message);
            }
            answer += chunk.choices?.[0]?.delta?.content || '';
            out.textContent = answer;
            this.log.scrollTop = this.log.scrollHeight;
          }
        }
      }
    } catch (e: any) {
      out.append(el('span', { class: 'bkg-chat-error' }, e.name === 'AbortError' ? ' [stopped]' : ` [${e.message}]`));
    } finally {
      this.history.push({ role: 'assistant', content: answer });
      this.controller = null;
      (this.stop as HTMLButtonElement).disabled = true;
      (this.send as HTMLButtonElement).disabled = false;
    }
  }
}
