// A plugin's settings as JupyterLab's own form component (rjsf) from the plugin's JSON Schema: the schema's
// rules are checked as you type, the gateway's 422 is shown on the field it names; save and revert.
import { FormComponent } from '@jupyterlab/ui-components';
import validator from '@rjsf/validator-ajv8';
import * as React from 'react';
import { createRoot, Root } from 'react-dom/client';

import { BkgError, request } from './api';

interface IProps {
  pluginId: string;
  schema: any;
  initial: Record<string, any>;
}

// Pydantic writes an optional setting as `anyOf: [{type: X}, {type: 'null'}]`, which rjsf draws as a selector of
// "option 1 / option 2": give it one field of type [X, 'null'] instead (empty means null), enums included.
export function flattenNullable(schema: any): any {
  const defs = schema.$defs || schema.definitions || {};
  const deref = (s: any): any => {
    const ref = typeof s?.$ref === 'string' ? s.$ref.split('/').pop() : null;
    return ref && defs[ref] ? { ...defs[ref] } : s;
  };
  const properties: Record<string, any> = {};
  for (const [name, prop] of Object.entries<any>(schema.properties || {})) {
    const options = prop.anyOf || prop.oneOf;
    const rest = Array.isArray(options) ? options.filter((o: any) => o?.type !== 'null') : null;
    if (!rest || rest.length !== 1 || rest.length === options.length) {
      properties[name] = prop;
      continue;
    }
    const inner = deref(rest[0]);
    const { anyOf, oneOf, ...outer } = prop; // eslint-disable-line @typescript-eslint/no-unused-vars
    const merged: any = { ...inner, ...outer };
    if (inner.type) {
      merged.type = [...(Array.isArray(inner.type) ? inner.type : [inner.type]), 'null'];
    }
    if (Array.isArray(inner.enum)) {
      merged.enum = [...inner.enum, null];
    }
    properties[name] = merged;
  }
  return { ...schema, properties };
}

function SettingsForm(props: IProps): JSX.Element {
  const [saved, setSaved] = React.useState(props.initial);
  const [data, setData] = React.useState<Record<string, any>>(props.initial);
  const [extraErrors, setExtraErrors] = React.useState<any>(undefined);
  const [status, setStatus] = React.useState('');
  const [version, setVersion] = React.useState(0); // remounts the form on revert
  const flatSchema = React.useMemo(() => flattenNullable(props.schema), [props.schema]);

  const save = async () => {
    const { errors } = validator.validateFormData(data, flatSchema);
    if (errors.length) {
      setStatus('Not saved: fix the fields marked in red.');
      return;
    }
    try {
      const r = await request(`api/plugins/${props.pluginId}/config`, {
        method: 'PUT',
        body: JSON.stringify({ config: data })
      });
      setSaved(r.config);
      setData(r.config);
      setExtraErrors(undefined);
      setStatus(r.restarted ? 'Saved; the plugin restarted to apply it.' : 'Saved.');
    } catch (e: any) {
      const field = e instanceof BkgError && e.field ? e.field.replace(/^config\./, '').split('.')[0] : null;
      if (field && field in (props.schema.properties || {})) {
        setExtraErrors({ [field]: { __errors: [e.message] } });
        setStatus('Not saved: fix the field marked in red.');
      } else {
        setStatus(`Not saved: ${e.message}`);
      }
    }
  };

  return (
    <div className="bkg-settings">
      <FormComponent
        key={version}
        schema={flatSchema}
        formData={data as any}
        validator={validator as any}
        liveValidate
        showErrorList={false}
        extraErrors={extraErrors}
        onChange={e => setData((e.formData || {}) as Record<string, any>)}
        uiSchema={{ 'ui:submitButtonOptions': { norender: true } }}
      />
      <div className="bkg-form-actions">
        <button type="button" className="jp-Button bkg-save" onClick={() => void save()}>
          Save
        </button>
        <button
          type="button"
          className="jp-Button bkg-revert"
          onClick={() => {
            setData(saved);
            setExtraErrors(undefined);
            setStatus('');
            setVersion(v => v + 1);
          }}
        >
          Revert
        </button>
        <span className="bkg-form-status">{status}</span>
      </div>
    </div>
  );
}

/** Render the form into `node`; returns the root so the caller can unmount it. */
export function mountSettingsForm(node: HTMLElement, pluginId: string, schema: any, config: Record<string, any>): Root {
  const root = createRoot(node);
  root.render(<SettingsForm pluginId={pluginId} schema={schema} initial={config} />);
  return root;
}
